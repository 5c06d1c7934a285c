"""Command line: ``fastkd demo`` (the main job), ``fastkd distill`` (the same on a real file) and
``fastkd export`` (a distill run's student, for serving)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from .cli_args import (DIST_TIMEOUT_S, EXPORT_FORMATS, MIN_STEPS_PER_EPOCH, MODEL_NAMES, _bad_rows,  # noqa: F401
                       _bucket_count, _csv, _export_formats, _positive_int, _seed, add_training_args)


def auto_batch_size(n_train: int, cap: int = 2048) -> int:
    """``cap``, halved (down to 32) until ``n_train`` rows make at least 32 steps an epoch.

    At batch 2048 a 6K-row sample trains 3 steps an epoch and early stopping judges noise;
    Frappe-size data (70K rows) keeps 2048.
    """
    bs = cap
    while bs > 32 and n_train < MIN_STEPS_PER_EPOCH * bs:
        bs //= 2
    return bs


def _spec(args):
    from .experiment import ABLATIONS, ExperimentSpec, parse_ablation
    from .train import TrainConfig

    every = [a for a in ABLATIONS if a != "segments" or getattr(args, "segment_field", None)]
    abl = [a for item in args.ablations for a in (every if item == "all" else [item])]
    batch_size = args.batch_size or getattr(args, "batch_size_cap", 2048)
    cfg = TrainConfig(max_epochs=args.max_epochs, batch_size=batch_size, lr=args.lr,
                      early_stop=args.early_stop, patience=args.patience, progress=args.progress or None,
                      precision=args.precision, merge_validation=args.merge_validation,
                      monitor_fraction=args.monitor_fraction, monitor_window=args.monitor_window,
                      steps_per_epoch=args.steps_per_epoch, row_blocks=args.row_blocks,
                      average_window=args.average_window, grad_clip_norm=args.grad_clip_norm)
    spec = ExperimentSpec(
        teachers=args.teachers, student=args.student, mode=args.mode, gate=args.gate, gate_fit=args.gate_fit,
        ensemble=args.ensemble, temperature=args.temperature, hard_weight=args.hard_weight,
        kd_weight=args.kd_weight, teacher_folds=args.teacher_folds, augment=args.augment,
        augment_swap=args.augment_swap, teacher_rows=args.teacher_rows, student_dropout=args.student_dropout,
        student_head_init=args.student_head_init, hint_weight=args.hint_weight,
        student_embed_init=args.student_embed_init,
        seeds=list(range(args.seeds)), ablations=abl,
        model_kwargs={"embed_dim": args.embed_dim, "hidden_units": tuple(args.hidden_units), "dropout": args.dropout},
        config=cfg, segment_field=getattr(args, "segment_field", None))
    for item in abl:  # a bad ablation fails here, before any training
        try:
            parse_ablation(item, spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--ablations: {e}") from None
    return spec


def _check_out(args) -> None:
    """Before any data is read: ``--out`` can be written (every rank checks; nothing is left
    behind), and with ``--resume`` it holds a run to continue."""
    out = Path(args.out)
    where = out.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    if where.exists() and not where.is_dir():
        what = "is a file" if where == out.absolute() else f"cannot be created: {where} is a file"
        raise NotADirectoryError(f"--out {out} {what}, not a folder")
    try:  # a folder made and removed at once: the real test of permissions, read-only mounts, quotas
        os.rmdir(tempfile.mkdtemp(prefix=".fastkd-write-check-", dir=where))
    except OSError as e:
        raise PermissionError(f"--out {out} is not writable: cannot create files in {where} "
                              f"({e.strerror or e})") from None
    if args.resume:
        from .experiment.runner import RUN_FILE

        run = out / "checkpoints" / RUN_FILE
        if not run.is_file():
            raise FileNotFoundError(f"--resume: nothing to resume in --out {out} ({run} does not exist: no run "
                                    "with this --out has started); run without --resume")
    else:
        taken = _run_names(out)
        if taken and not _is_run_folder(out):
            raise FileExistsError(f"--out {out} holds {', '.join(taken)}, which no fastkd run wrote (no "
                                  "checkpoints/run.json, and neither report.md nor results.json is a fastkd "
                                  "report): a fresh run would remove them; choose another --out, or move them")


def _run_names(out: Path) -> List[str]:
    """The names in ``out`` that a fresh run removes (results, saved student, checkpoints)."""
    from .experiment.report import RESULT_FILES
    from .serving import STUDENT_DIR

    names = [n for n in RESULT_FILES if (out / n).exists()]
    names += [f"{d}/" for d in (STUDENT_DIR, "checkpoints") if (out / d).is_dir() and any((out / d).iterdir())]
    return names


def _is_run_folder(out: Path) -> bool:
    """Whether ``out`` holds a fastkd run: its ``checkpoints/run.json``, a report whose first line
    is fastkd's title, or a records file of fastkd's shape (a list of records with a role)."""
    import json

    from .experiment.report import REPORT_TITLE
    from .experiment.runner import RUN_FILE

    if (out / "checkpoints" / RUN_FILE).is_file():
        return True
    try:
        with open(out / "report.md", encoding="utf-8", errors="replace") as fh:
            if fh.readline().startswith(REPORT_TITLE):
                return True
    except OSError:
        pass
    for name in ("results.json", "results.partial.json"):
        try:
            records = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(records, list) and records and all(isinstance(r, dict) and "role" in r for r in records):
            return True
    return False


def _check_classes(spec, train, valid, test) -> None:
    """Every split the run scores by AUC holds both labels (else AUC is undefined, and the run
    would stop there after training models), checked before anything is trained or removed."""
    import numpy as np

    splits = [("training", train.labels), ("validation", valid.labels), ("test", test.labels)]
    if spec.config.merge_validation and len(valid) >= 2:  # its first rows, as TrainConfig.split_validation cuts
        splits.append(("monitor (the validation rows students stop on)",
                        valid.labels[:spec.config.monitor_rows(len(valid))]))
    for name, labels in splits:
        # block by block (labels may be memory-mapped, tens of millions of rows): no copy, no sort,
        # and usually done after the first block
        lo = hi = None
        for a in range(0, len(labels), 1 << 20):
            block = np.asarray(labels[a:a + (1 << 20)])
            lo = block.min() if lo is None else min(lo, block.min())
            hi = block.max() if hi is None else max(hi, block.max())
            if lo != hi:
                break
        if lo is None or lo == hi:
            held = "no rows" if lo is None else f"only label {float(lo):g}"
            raise ValueError(f"the {name} split ({len(labels):,} rows) holds {held}: AUC needs both classes; use "
                             "more rows or another split (--split-seed)")


def _mismatch(args, e) -> ValueError:
    """``--resume`` refused: the saved run's setting ``e.field`` differs from this command's."""
    top, _, rest = e.field.partition(".")
    if top == "data":
        what = (f"the data ({e.field}: other rows, labels, split or encoding than the saved run's; "
                "--data/--train/--valid/--test, --split-seed, --encoder, --dev, --rows, --data-seed ...)")
        values = ""
    else:
        key = rest.split(".")[0] if top in ("config", "model_kwargs") and rest else top
        flag = "--" + key.replace("_", "-")
        what = f"{flag} ({e.field})" if hasattr(args, key) else e.field
        expected, found = e.expected, e.found
        if key == "seeds" and isinstance(expected, list) and isinstance(found, list):
            expected, found = len(expected), len(found)  # --seeds N means seeds 0..N-1
        values = f": this command has {expected!r}, the saved run {found!r}"
    return ValueError(f"--resume: {what} differs from the run saved in {e.path}{values}; resume with the same "
                      "settings, or run without --resume to start afresh (removes that run's results)")


def _clear_out(out: Path, resume: bool, log) -> None:
    """Remove an earlier run's results from ``out`` (rank 0), saying so; a fresh run also
    removes its checkpoints (run_experiment does, after this message) and its saved student
    (a resumed run keeps it: the unit that saved it is not trained again)."""
    from .experiment.report import RESULT_FILES
    from .serving import STUDENT_DIR

    from .serving.export import EXPORT_FILES
    from .serving.student import STUDENT_FILE

    stale = [out / n for n in RESULT_FILES if (out / n).exists()]
    ckpt = out / "checkpoints"
    names = [p.name for p in stale] + (["checkpoints/"] if not resume and ckpt.is_dir() and any(ckpt.iterdir())
                                       else [])
    student = out / STUDENT_DIR
    kept = []
    if not resume and student.is_dir():
        # only what a run (or fastkd export) writes there; anything else stays, and is named
        own = [student / n for n in (STUDENT_FILE, *EXPORT_FILES)]
        stale += [p for p in own if p.exists()]
        kept = sorted(p.name for p in student.iterdir() if p not in own)
        if any(p.exists() for p in own):
            names.append(f"{STUDENT_DIR}/")
    if names:
        log(f"out: removing {'the interrupted' if resume else 'an earlier'} run's {', '.join(names)} from {out} "
            + ("(rewritten as the run goes on)" if resume else
               "first (--resume continues an interrupted run instead)"))
    if kept:
        log(f"out: keeping {', '.join(kept)} in {student} (not written by fastkd)")
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _run(args, train, valid, test, data_desc: str, read_reports=None, encoder=None) -> int:
    import torch

    from . import distributed
    from .experiment import check_resume, command_line, run_experiment, table, write_report
    from .experiment.report import read_summary
    from .experiment.resume import earlier_wall_seconds, save_wall_seconds
    from .train.manifest import ArtifactMismatchError

    from .allocator import tune_cpu_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    # process-wide, so only an entry point may do it: keeps freed activation buffers mapped
    # between steps instead of page-faulting them back in (15-20% of a CPU training step)
    tune_cpu_allocator()
    if args.dev:  # demo has no --split-seed: its split is seeded 0
        (train, valid, test), more = _dev_split(train, valid, test, getattr(args, "split_seed", 0))
        data_desc += more
    if args.batch_size is None:
        args.batch_size = auto_batch_size(len(train), args.batch_size_cap)
        data_desc += f"; batch size {args.batch_size} (auto)"
    spec = _spec(args)
    _check_classes(spec, train, valid, test)
    if spec.segment_field is not None and spec.segment_field not in train.field_names:
        names = ", ".join(train.field_names[:20]) + (", ..." if len(train.field_names) > 20 else "")
        raise ValueError(f"--segment-field {spec.segment_field!r} is not a field of the data (its fields: {names})")
    t0 = time.perf_counter()
    # under torchrun every rank runs the whole experiment; rank 0 alone prints and writes
    main_rank = distributed.is_main_process()
    world = distributed.get_world_size()
    if world > 1:
        data_desc += f"; data-parallel over {world} processes (torch.distributed, {torch.distributed.get_backend()})"
    log = (lambda m: print(m, flush=True)) if main_rank else (lambda m: None)
    out = Path(args.out)
    ckpt = out / "checkpoints"
    if args.resume:  # refused before anything is removed or trained
        try:
            check_resume(ckpt, spec, train, valid, test)
        except ArtifactMismatchError as e:
            if e.path.parent != ckpt:
                raise
            raise _mismatch(args, e) from None
    log(f"data: {data_desc}")
    if read_reports:
        log(f"rows read: {read_summary(read_reports)}")
    from .serving import STUDENT_DIR
    from .serving.raw_rows import ENCODER_FILE

    if main_rank:
        _clear_out(out, args.resume, log)
        if encoder is not None:  # beside the student the run will save: raw values -> the ids it was trained on
            encoder.save(out / STUDENT_DIR / ENCODER_FILE)
    # a resumed run's wall time adds what its earlier processes spent up to their last finished model
    earlier = earlier_wall_seconds(ckpt) if args.resume else 0.0
    if args.resume:
        log(f"resume: continuing the run saved in {ckpt} (finished models are loaded, not retrained)")
    command = command_line()

    def wall_seconds() -> float:
        return earlier + time.perf_counter() - t0

    def notes(result) -> str:
        return (f"Resumed (`--resume`): {result.loaded} of these rows were loaded from models an interrupted run "
                "had finished (their timings are that run's); the wall time adds each earlier process's time up "
                "to its last finished model." if result.loaded else "")

    def partial_report(result) -> None:  # after every finished model: report.md marked partial
        wall = wall_seconds()
        save_wall_seconds(ckpt, wall)
        write_report(out, result, command=command, data_desc=data_desc, spec=spec, notes=notes(result),
                     wall_seconds=wall, read_reports=read_reports, partial=True)

    result = run_experiment(train, valid, test, spec, log=log,
                            partial=out / "results.partial.json" if main_rank else None,
                            checkpoint_dir=ckpt, resume=args.resume, on_finished=partial_report,
                            student_dir=out / STUDENT_DIR, serving=args.serving)
    wall = wall_seconds()
    if not main_rank:
        return 0
    save_wall_seconds(ckpt, wall)
    report = write_report(out, result, command=command, data_desc=data_desc, spec=spec,
                          wall_seconds=wall, read_reports=read_reports, notes=notes(result))
    (out / "results.partial.json").unlink(missing_ok=True)
    print()
    print(table(result.records))
    print(f"\nreport: {report}  (results.json and plots beside it; {wall:.0f} s)")
    return 0


def _dev_split(train, valid, test, seed: int):
    """``--dev``: set the test split aside unread; split train + valid again 80/10/10."""
    import numpy as np

    from .data import CTRData

    rest = CTRData.concat([train, valid])
    n = len(rest)
    perm = np.random.default_rng(seed + 1).permutation(n)
    a, b = int(0.8 * n), int(0.8 * n) + int(0.1 * n)
    parts = rest.subset(perm[:a]), rest.subset(perm[a:b]), rest.subset(perm[b:])
    desc = (f"; --dev: the test split ({len(test):,} rows) set aside unread, train + valid permuted by "
            f"numpy.random.default_rng({seed + 1}) and split 80/10/10 -> {len(parts[0]):,} / {len(parts[1]):,} / "
            f"{len(parts[2]):,} (train / valid / dev); the table's test metrics are the dev split's")
    return parts, desc


def cmd_demo(args) -> int:
    _check_out(args)
    from .data import make_synthetic
    from .data.segmented import make_segmented

    if args.synthetic == "segmented":
        data = make_segmented(args.rows, seed=args.data_seed)
        args.segment_field = "segment"
        what = "segmented generator (fastkd.data.make_segmented"
    else:
        data = make_synthetic(args.rows, seed=args.data_seed)
        what = "built-in synthetic CTR generator (fastkd.data.make_synthetic"
    train, valid, test = data.split((0.8, 0.1, 0.1), seed=0)
    desc = (f"{what}, seed {args.data_seed}): "
            f"{len(data):,} rows, {len(data.field_sizes)} fields, positive rate {data.labels.mean():.3f}; "
            f"split 80/10/10 -> {len(train):,} / {len(valid):,} / {len(test):,}")
    return _run(args, train, valid, test, desc)


def cmd_distill(args) -> int:
    from .cli_data import read_splits

    _check_out(args)
    train, valid, test, desc, reports, encoder = read_splits(args)
    return _run(args, train, valid, test, desc, reports, encoder=encoder)


def cmd_export(args) -> int:
    import torch

    from .serving import export_student

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        doc = export_student(args.run, args.to, formats=args.format)
    except ImportError as e:  # ONNX asked for, fastkd[serving] not installed
        raise ValueError(f"{e}; or export TorchScript alone with --format torchscript") from None
    run = doc.get("run", {})
    about = f" ({run.get('row')}, seed {run.get('seed')}, test AUC {run['test_auc']:.4f})" if "test_auc" in run else ""
    print(f"student: {doc['model']} from {doc.get('from', args.run)}{about}")
    files = doc["files"]
    written = [files["torchscript"]] if "torchscript" in files else []
    written += files.get("onnx", []) + ([files["encoder"]] if "encoder" in files else []) + ["serving.json"]
    print(f"wrote to {args.to}: {', '.join(written)}")
    checks = doc["checks"]
    print(f"checked on {checks['rows']} (tolerance {doc['tolerance']:g}):")
    for name, c in checks.items():
        if not isinstance(c, dict):
            continue
        what = {"pytorch_vs_saved": "PyTorch, reloaded, vs its logits when saved"}.get(name, f"{name} vs PyTorch")
        auc = (f"; test AUC {c['auc_exported']:.4f} vs {c['auc_pytorch']:.4f} (PyTorch)" if "auc_exported" in c else "")
        print(f"  {what}: max |logit diff| {c['max_abs_diff']:.2e}{auc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd", description="Ensemble knowledge distillation for CTR prediction")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="teachers, plain DNN and distilled students on built-in synthetic data")
    demo.add_argument("--rows", type=_positive_int, default=100_000)
    demo.add_argument("--data-seed", type=_seed, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--synthetic", choices=("default", "segmented"), default="default",
                      help="segmented: segments with different interaction structures, where teachers of "
                           "different architectures are best on different rows (a per-segment AUC table follows)")
    add_training_args(demo, max_epochs=6, batch_size=2048)
    demo.set_defaults(hidden_units=[256, 256])  # keeps `make demo` within a few minutes on 2 cores
    demo.set_defaults(func=cmd_demo)

    d = sub.add_parser("distill", help="the same on a real CTR file")
    d.add_argument("--data", help="KIND:PATH[,PATH...] with KIND in criteo, avazu, libfm, csv, parquet")
    d.add_argument("--train")
    d.add_argument("--valid")
    d.add_argument("--test")
    d.add_argument("--split-seed", type=_seed, default=0)
    d.add_argument("--label", default=None, help="label column (csv/parquet)")
    d.add_argument("--numeric", type=_csv(str), default=None, help="numeric columns (bucketised)")
    d.add_argument("--encoder", choices=("vocab", "hash"), default="vocab",
                   help="vocab: a vocabulary per field (--min-count); hash: feature hashing, no vocabulary "
                        "(needs --num-buckets)")
    d.add_argument("--num-buckets", type=_csv(_bucket_count), default=None,
                   help="--encoder hash: ids per field, id 0 the missing value (>= 2); one count for every "
                        "field or one per field, comma-separated")
    d.add_argument("--min-count", type=_positive_int, default=1)
    d.add_argument("--strict", action="store_true", help="raise on the first malformed line")
    d.add_argument("--max-bad-rows", type=_bad_rows, default=None,
                   help="malformed lines skipped (counted, warned about, in the report) up to this many: a count "
                        "(10), a fraction of the lines read (0.01) or a percentage (1%%); more stops the run "
                        "before any training (default: 1%%; 0 refuses any, after reading them all)")
    d.add_argument("--cache-dir", default=None,
                   help="with --data: encode the file once into a memory-mapped cache in this folder and reuse "
                        "it on later runs with the same file and settings (large data: the rows stay on disk)")
    d.add_argument("--out", required=True)
    d.add_argument("--segment-field", default=None, help="field whose values split the test rows into segments "
                                                         "for a per-segment AUC table")
    add_training_args(d, max_epochs=50, batch_size=2048)
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("export", help="write a distill run's student as TorchScript and ONNX, with its encoder, "
                                      "checked against PyTorch")
    e.add_argument("--run", required=True, help="the --out of a `fastkd distill` or `fastkd demo` run (or its "
                                                "student/ folder)")
    e.add_argument("--to", required=True, help="output folder: student.torchscript.pt, student.onnx, encoder.json, "
                                               "serving.json")
    e.add_argument("--format", type=_export_formats, default=list(EXPORT_FORMATS),
                   help="comma list of torchscript, onnx (default both; onnx needs fastkd[serving])")
    e.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    e.set_defaults(func=cmd_export, dist_timeout=DIST_TIMEOUT_S)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import distributed

    # launched by torchrun (WORLD_SIZE > 1): join the group; loops shard, rank 0 reports
    joined = False
    try:
        if distributed.launched_distributed():
            joined = distributed.init_process_group(timeout_s=args.dist_timeout)
    except Exception as e:  # a peer that never arrives: torch's DistStoreError after --dist-timeout
        print(f"fastkd: error: could not join the process group (rank {os.environ.get('RANK', '?')} of "
              f"{os.environ.get('WORLD_SIZE', '?')}, --dist-timeout {args.dist_timeout:g} s): "
              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, OSError) as e:
        print(f"fastkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastkd: interrupted (the same command with --resume continues it; finished models are kept)",
              file=sys.stderr)
        return 130
    finally:
        if joined:
            distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``fastkd demo`` (the main job) and ``fastkd distill`` (the same on a real file)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

# fastkd.models.MODELS' keys, spelled out so that parsing arguments (and --help) does not import
# torch; tests/test_cli.py keeps the two equal.
MODEL_NAMES = ("dnn", "widedeep", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint")


def _csv(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]
    return parse


def _models(text: str):
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(bad) or text!r}; choose from {', '.join(MODEL_NAMES)}")
    return names


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


MIN_STEPS_PER_EPOCH = 32


def auto_batch_size(n_train: int, cap: int = 2048) -> int:
    """``cap``, halved (down to 32) until ``n_train`` rows make at least 32 steps an epoch.

    At batch 2048 a 6K-row sample trains 3 steps an epoch and early stopping judges noise;
    Frappe-size data (70K rows) keeps 2048.
    """
    bs = cap
    while bs > 32 and n_train < MIN_STEPS_PER_EPOCH * bs:
        bs //= 2
    return bs


def _add_training_args(p: argparse.ArgumentParser, *, max_epochs: int, batch_size: int) -> None:
    p.add_argument("--teachers", type=_models, default=["deepfm", "dcn", "xdeepfm"], help="teacher models")
    p.add_argument("--student", type=lambda s: _models(s)[0], default="dnn", help="student model")
    p.add_argument("--mode", choices=("pretrain", "cotrain"), default="pretrain")
    p.add_argument("--gate", choices=("logit", "hidden", "mean", "features"), default="features",
                   help="ensemble signal: the paper's logit gate, a gate on the teachers' hidden vectors, plain "
                        "averaging, or a gate on the sample's own fields (mixture-of-experts style; the default: "
                        "fitted on rows the teachers never saw, frozen, and uniform unless held-out rows say "
                        "otherwise, see docs/accuracy.md)")
    p.add_argument("--gate-fit", choices=("joint", "stacked"), default=None,
                   help="joint: the gate trains with the student (the paper's); stacked: fitted first on rows "
                        "with honest teacher logits, stopped on the monitor rows, then frozen (default: stacked "
                        "for --gate features, joint otherwise)")
    p.add_argument("--teacher-folds", type=_positive_int, default=1,
                   help="K >= 2 cross-fits the teachers: every student training row's soft label comes from a "
                        "fold model that never saw it (about K-1 times the teacher cost)")
    p.add_argument("--augment", type=_non_negative_float, default=1.0,
                   help="teacher-labelled augmented rows per training row (field-wise swaps; no hard label; "
                        "0 turns it off; default 1: about 2x the student's epoch cost)")
    p.add_argument("--augment-swap", type=float, default=0.2, help="per-field swap probability of augmentation")
    p.add_argument("--ensemble", choices=("logit", "prob"), default="logit")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--hard-weight", type=float, default=1.0)
    p.add_argument("--early-stop", choices=("auc", "logloss", "kd"), default="auc",
                   help="what every row stops on (default: validation AUC)")
    p.add_argument("--merge-validation", action=argparse.BooleanOptionalAction, default=True,
                   help="students and the plain DNN also train on the validation split except a held-out "
                        "slice that decides early stopping; teachers never see validation rows "
                        "(default: on; measured best on Frappe, see docs/results/frappe)")
    p.add_argument("--monitor-fraction", type=float, default=0.5,
                   help="share of the validation split held out to monitor early stopping when merging")
    p.add_argument("--monitor-window", type=_positive_int, default=3,
                   help="decide early stopping on the mean of the last N epochs' monitored values (1: the "
                        "last epoch's alone)")
    p.add_argument("--patience", type=_positive_int, default=None, help="default 2 (auc/logloss), 3 (kd)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--max-epochs", type=_positive_int, default=max_epochs)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"training batch size (default: {batch_size}, halved until an epoch has at least "
                        f"{MIN_STEPS_PER_EPOCH} steps, so small samples still train)")
    p.set_defaults(batch_size_cap=batch_size)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=_positive_int, default=16)
    p.add_argument("--hidden-units", type=_csv(int), default=[400, 400, 400])
    p.add_argument("--dropout", type=float, default=0.3,
                   help="dropout of every model's DNN part (0.3: best validation AUC of the plain DNN on Frappe)")
    p.add_argument("--ablations", type=_csv(str), default=[],
                   help="comma list of: hint, cotrain, kd-stop, kd-stop-merge, merge, partition (or 'all' for "
                        "these), or KEY=VALUE[+KEY=VALUE] overrides of a setting, e.g. teacher_folds=1, "
                        "gate=features, augment=0+gate=mean")
    p.add_argument("--dev", action="store_true",
                   help="choose settings without the test split: it is set aside unread, and the rest is split "
                        "again 80/10/10 into train/valid/dev; the table's 'test' metrics are then the dev split's")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the training forward passes (fast on CPUs with AMX)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--progress", action="store_true", help="show progress bars")


def _spec(args):
    from .experiment import ABLATIONS, ExperimentSpec, parse_ablation
    from .train import TrainConfig

    abl = [a for item in args.ablations for a in (ABLATIONS if item == "all" else [item])]
    batch_size = args.batch_size or getattr(args, "batch_size_cap", 2048)
    cfg = TrainConfig(max_epochs=args.max_epochs, batch_size=batch_size, lr=args.lr,
                      early_stop=args.early_stop, patience=args.patience, progress=args.progress or None,
                      precision=args.precision, merge_validation=args.merge_validation,
                      monitor_fraction=args.monitor_fraction, monitor_window=args.monitor_window)
    spec = ExperimentSpec(
        teachers=args.teachers, student=args.student, mode=args.mode, gate=args.gate, gate_fit=args.gate_fit,
        ensemble=args.ensemble, temperature=args.temperature, hard_weight=args.hard_weight,
        kd_weight=args.kd_weight, teacher_folds=args.teacher_folds, augment=args.augment,
        augment_swap=args.augment_swap, seeds=list(range(args.seeds)), ablations=abl,
        model_kwargs={"embed_dim": args.embed_dim, "hidden_units": tuple(args.hidden_units), "dropout": args.dropout},
        config=cfg, segment_field=getattr(args, "segment_field", None))
    for item in abl:  # a bad ablation fails here, before any training
        try:
            parse_ablation(item, spec)
        except ValueError as e:
            raise ValueError(f"--ablations: {e}") from None
    return spec


def _run(args, train, valid, test, data_desc: str) -> int:
    import torch

    from . import distributed
    from .experiment import command_line, run_experiment, table, write_report

    from .models.perf import tune_cpu_allocator

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
    t0 = time.perf_counter()
    # under torchrun every rank runs the whole experiment; rank 0 alone prints and writes
    main_rank = distributed.is_main_process()
    world = distributed.get_world_size()
    if world > 1:
        data_desc += f"; data-parallel over {world} processes (torch.distributed, {torch.distributed.get_backend()})"
    log = (lambda m: print(m, flush=True)) if main_rank else (lambda m: None)
    log(f"data: {data_desc}")
    result = run_experiment(train, valid, test, spec, log=log,
                            partial=Path(args.out) / "results.partial.json" if main_rank else None)
    wall = time.perf_counter() - t0
    if not main_rank:
        return 0
    report = write_report(Path(args.out), result, command=command_line(), data_desc=data_desc, spec=spec,
                          wall_seconds=wall)
    print()
    print(table(result.records))
    (Path(args.out) / "results.partial.json").unlink(missing_ok=True)
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
    from . import distributed
    from .data import load

    numeric = args.numeric or ()
    # under torchrun every rank reads and encodes its share of the files, then all hold the data
    sharded = distributed.get_world_size() > 1
    common = dict(kind=args.encoder, min_count=args.min_count, strict=args.strict, label=args.label, numeric=numeric,
                  sharded=sharded)
    if args.data:
        if args.train or args.valid or args.test:
            raise ValueError("give either --data or --train/--valid/--test, not both")
        data = load(args.data, **common)
        train, valid, test = data.split((0.8, 0.1, 0.1), seed=args.split_seed)
        desc = (f"`{args.data}`: {len(data):,} rows, {len(data.field_sizes)} fields, positive rate "
                f"{data.labels.mean():.3f}; rows permuted by numpy.random.default_rng({args.split_seed}), "
                f"80/10/10 -> {len(train):,} / {len(valid):,} / {len(test):,}; {args.encoder} encoding fitted on "
                f"the whole file (no labels used)")
    else:
        if not (args.train and args.valid and args.test):
            raise ValueError("give --data KIND:PATH, or all three of --train, --valid and --test")
        train, enc = load(args.train, return_encoder=True, **common)
        rest = dict(encoder=enc, strict=args.strict, label=args.label, numeric=numeric, sharded=sharded)
        valid = load(args.valid, **rest)
        test = load(args.test, **rest)
        desc = (f"train `{args.train}` ({len(train):,}), valid `{args.valid}` ({len(valid):,}), test "
                f"`{args.test}` ({len(test):,}); {args.encoder} encoding fitted on train")
    return _run(args, train, valid, test, desc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd", description="Ensemble knowledge distillation for CTR prediction")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="teachers, plain DNN and distilled students on built-in synthetic data")
    demo.add_argument("--rows", type=_positive_int, default=100_000)
    demo.add_argument("--data-seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--synthetic", choices=("default", "segmented"), default="default",
                      help="segmented: segments with different interaction structures, where teachers of "
                           "different architectures are best on different rows (a per-segment AUC table follows)")
    _add_training_args(demo, max_epochs=6, batch_size=2048)
    demo.set_defaults(hidden_units=[256, 256])  # keeps `make demo` within a few minutes on 2 cores
    demo.set_defaults(func=cmd_demo)

    d = sub.add_parser("distill", help="the same on a real CTR file")
    d.add_argument("--data", help="KIND:PATH[,PATH...] with KIND in criteo, avazu, libfm, csv, parquet")
    d.add_argument("--train")
    d.add_argument("--valid")
    d.add_argument("--test")
    d.add_argument("--split-seed", type=int, default=0)
    d.add_argument("--label", default=None, help="label column (csv/parquet)")
    d.add_argument("--numeric", type=_csv(str), default=None, help="numeric columns (bucketised)")
    d.add_argument("--encoder", choices=("vocab", "hash"), default="vocab")
    d.add_argument("--min-count", type=_positive_int, default=1)
    d.add_argument("--strict", action="store_true", help="raise on the first malformed line")
    d.add_argument("--out", required=True)
    d.add_argument("--segment-field", default=None, help="field whose values split the test rows into segments "
                                                         "for a per-segment AUC table")
    _add_training_args(d, max_epochs=50, batch_size=2048)
    d.set_defaults(func=cmd_distill)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import distributed

    # launched by torchrun (WORLD_SIZE > 1): join the group; loops shard, rank 0 reports
    joined = distributed.init_process_group() if distributed.launched_distributed() else False
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, OSError) as e:
        print(f"fastkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastkd: interrupted", file=sys.stderr)
        return 130
    finally:
        if joined:
            distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

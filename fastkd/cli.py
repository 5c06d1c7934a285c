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


def _add_training_args(p: argparse.ArgumentParser, *, max_epochs: int, batch_size: int) -> None:
    p.add_argument("--teachers", type=_models, default=["deepfm", "dcn", "xdeepfm"], help="teacher models")
    p.add_argument("--student", type=lambda s: _models(s)[0], default="dnn", help="student model")
    p.add_argument("--mode", choices=("pretrain", "cotrain"), default="pretrain")
    p.add_argument("--gate", choices=("logit", "hidden", "mean"), default="logit")
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
    p.add_argument("--monitor-fraction", type=float, default=0.2,
                   help="share of the validation split held out to monitor early stopping when merging")
    p.add_argument("--patience", type=_positive_int, default=None, help="default 2 (auc/logloss), 3 (kd)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--max-epochs", type=_positive_int, default=max_epochs)
    p.add_argument("--batch-size", type=_positive_int, default=batch_size)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=_positive_int, default=16)
    p.add_argument("--hidden-units", type=_csv(int), default=[400, 400, 400])
    p.add_argument("--dropout", type=float, default=0.3,
                   help="dropout of every model's DNN part (0.3: best validation AUC of the plain DNN on Frappe)")
    p.add_argument("--ablations", type=_csv(str), default=[],
                   help="comma list of: hint, cotrain, kd-stop, kd-stop-merge, merge, partition (or 'all')")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the training forward passes (fast on CPUs with AMX)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--progress", action="store_true", help="show progress bars")


def _spec(args):
    from .experiment import ABLATIONS, ExperimentSpec
    from .train import TrainConfig

    abl = list(ABLATIONS) if args.ablations == ["all"] else args.ablations
    for a in abl:
        if a not in ABLATIONS:
            raise ValueError(f"--ablations: unknown {a!r}; choose from {', '.join(ABLATIONS)} or 'all'")
    cfg = TrainConfig(max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr,
                      early_stop=args.early_stop, patience=args.patience, progress=args.progress or None,
                      precision=args.precision, merge_validation=args.merge_validation,
                      monitor_fraction=args.monitor_fraction)
    return ExperimentSpec(
        teachers=args.teachers, student=args.student, mode=args.mode, gate=args.gate, ensemble=args.ensemble,
        temperature=args.temperature, hard_weight=args.hard_weight, kd_weight=args.kd_weight,
        seeds=list(range(args.seeds)), ablations=abl,
        model_kwargs={"embed_dim": args.embed_dim, "hidden_units": tuple(args.hidden_units), "dropout": args.dropout},
        config=cfg)


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


def cmd_demo(args) -> int:
    from .data import make_synthetic

    data = make_synthetic(args.rows, seed=args.data_seed)
    train, valid, test = data.split((0.8, 0.1, 0.1), seed=0)
    desc = (f"built-in synthetic CTR generator (fastkd.data.make_synthetic, seed {args.data_seed}): "
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

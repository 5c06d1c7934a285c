"""The CLI's arguments: value types that fail with one clear line, and the training options
``fastkd demo`` and ``fastkd distill`` share (:func:`add_training_args`)."""
from __future__ import annotations

import argparse

# the auto batch size keeps at least this many steps an epoch (fastkd.cli.auto_batch_size)
MIN_STEPS_PER_EPOCH = 32
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


def _one_model(text: str) -> str:
    names = _models(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"expected one model, got {len(names)}: {', '.join(names)}")
    return names[0]


def _number(kind, ok, what: str):
    """An argparse type: ``kind(text)`` accepted when ``ok(value)``, else the error says ``what``."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_seed = _number(int, lambda v: v >= 0, "a seed, an integer >= 0")
# a hashed field's ids: id 0 is the missing value, so at least one more
_bucket_count = _number(int, lambda v: v >= 2, "a bucket count >= 2")
_positive_seconds = _number(float, lambda v: 0 < v < float("inf"), "a positive number of seconds")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
# `v >= 0` is False for NaN, so NaN is refused too
_non_negative_float = _number(float, lambda v: v >= 0 and v != float("inf"), "a finite number >= 0")


def _bad_rows(text: str):
    """``--max-bad-rows``: ``N`` (an int: a row count), a fraction in [0, 1] (``0.01``) or a percentage (``1%``)."""
    t = text.strip()
    what = "a row count (e.g. 10), a fraction of the rows read in [0, 1] (e.g. 0.01) or a percentage (e.g. 1%)"
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else int(t) if t.lstrip("+").isdigit() else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (v >= 0 and (isinstance(v, int) or v <= 1)):  # NaN fails `v >= 0`
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


# fastkd.serving.FORMATS, spelled out so that parsing arguments does not import torch (tests/test_serving.py
# keeps the two equal)
EXPORT_FORMATS = ("torchscript", "onnx")


def _export_formats(text: str):
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in EXPORT_FORMATS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(bad) or text!r}; choose from "
                                         f"{', '.join(EXPORT_FORMATS)}")
    return names


# --dist-timeout's default: torch.distributed's default_pg_timeout (30 minutes), stated here so that
# the documented value does not move with torch
DIST_TIMEOUT_S = 1800.0


def add_training_args(p: argparse.ArgumentParser, *, max_epochs: int, batch_size: int) -> None:
    p.add_argument("--teachers", type=_models, default=["deepfm", "dcn", "xdeepfm"], help="teacher models")
    p.add_argument("--student", type=_one_model, default="dnn", help="student model (one)")
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
    p.add_argument("--teacher-rows", choices=("train", "merged"), default="train",
                   help="rows the teachers train on: the training split, stopped on the whole validation split "
                        "(default), or with merged validation the student's rows too, stopped on the monitor "
                        "rows (a stacked gate then fits on the monitor rows alone)")
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
    p.add_argument("--average-window", action="store_true",
                   help="students and the plain DNN end with the mean of the weights of the best monitor "
                        "window's epochs (checkpoint averaging) instead of its last epoch's")
    p.add_argument("--grad-clip-norm", type=_positive_float, default=None,
                   help="clip the gradients of the students and the plain DNN to this total 2-norm before "
                        "each step (FuxiCTR's trainer: 10; teachers are not clipped); default none")
    p.add_argument("--patience", type=_positive_int, default=None, help="default 2 (auc/logloss), 3 (kd)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--max-epochs", type=_positive_int, default=max_epochs)
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="at most this many batches an epoch, each epoch still a shuffle of every row (scale runs "
                        "and quick checks on data too large to pass over in full; default: all)")
    p.add_argument("--row-blocks", type=_positive_int, default=None,
                   help="cut the training rows into N contiguous blocks, each shuffled on its own; under torchrun "
                        "N must be the number of ranks and each rank reads only its block (default: one shuffle of "
                        "every row, dealt to ranks)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"training batch size (default: {batch_size}, halved until an epoch has at least "
                        f"{MIN_STEPS_PER_EPOCH} steps, so small samples still train)")
    p.set_defaults(batch_size_cap=batch_size)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=_positive_int, default=16)
    p.add_argument("--hidden-units", type=_csv(int), default=[400, 400, 400])
    p.add_argument("--dropout", type=float, default=0.3,
                   help="dropout of every teacher's DNN part (0.3: best validation AUC of the plain DNN on Frappe); the student's: --student-dropout")
    p.add_argument("--student-dropout", type=str, default="0.1/0.3",
                   help="dropout of the student network (distilled students and the plain DNN); several values are "
                        "candidates: each student and the plain DNN is trained once per value and the best on the "
                        "monitor rows kept (default 0.1/0.3, docs/accuracy.md round 10; 'none': --dropout)")
    p.add_argument("--student-head-init", choices=("torch", "xavier"), default=None,
                   help="output layer initialisation of the student network (students and plain DNN): torch's "
                        "nn.Linear default, or xavier (Xavier-normal, zero bias, as FuxiCTR); default torch")
    p.add_argument("--hint-weight", type=_non_negative_float, default=0.0,
                   help="weight of the hint loss (student hidden vector regressed on each teacher's; 0: off)")
    p.add_argument("--student-embed-init", choices=("teacher",), default=None,
                   help="teacher: distilled students start from the embedding tables of the teacher with the best "
                        "monitor AUC (same field sizes and --embed-dim); default: their own initialisation")
    p.add_argument("--ablations", type=_csv(str), default=[],
                   help="comma list of: hint, cotrain, kd-stop, kd-stop-merge, merge, partition, segments "
                        "(one teacher per --segment-field value), or 'all' for these, or KEY=VALUE[+KEY=VALUE] "
                        "overrides of a setting, e.g. teacher_folds=1, gate=features, augment=0+gate=mean")
    p.add_argument("--dev", action="store_true",
                   help="choose settings without the test split: it is set aside unread, and the rest is split "
                        "again 80/10/10 into train/valid/dev; the table's 'test' metrics are then the dev split's")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the training forward passes (fast on CPUs with AMX)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (same command otherwise): models it finished are "
                        "loaded, not retrained, the one in training resumes from its last epoch, and the results "
                        "equal an uninterrupted run's; refused when a setting or the data differ, except that a "
                        "larger --seeds adds seeds to the saved run. Without it, a "
                        "run into an --out holding an earlier run removes that run's results and checkpoints first")
    p.add_argument("--serving", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the default student's serving cost against the teacher ensemble (p50/p99 latency "
                        "at batch 1 and 256, samples/s; PyTorch, and onnxruntime with its check on the test split "
                        "when fastkd[serving] is installed; a few seconds) for report.md's serving table")
    p.add_argument("--dist-timeout", type=_positive_seconds, default=DIST_TIMEOUT_S, metavar="SECONDS",
                   help=f"under torchrun: how long a rank waits for its peers, at the rendezvous and in every "
                        f"collective, before failing (default {DIST_TIMEOUT_S:g}, torch's own default)")

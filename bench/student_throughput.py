"""Student (DNN) training throughput, timed alike: fastkd vs DeepCTR-Torch vs FuxiCTR, one run.

Every library trains the same network on the same Frappe training rows: embedding 16 per field,
MLP 400-400-400 with batch norm and dropout 0.1, one logit, Adam 1e-3, batch 2048, the same torch
threads. The timed region is the same for all three: **one whole epoch call**, with the library's
own data loading and optimiser set-up inside it, and no evaluation worth counting (fastkd and
FuxiCTR, which always score a validation set after an epoch, get the same 512 rows; DeepCTR-Torch
gets none):

* fastkd: ``train_model(model, train, valid_512, TrainConfig(max_epochs=1))``;
* DeepCTR-Torch 0.3.x: ``model.fit(x, y, batch_size=2048, epochs=1)`` (its ``DeepFM`` with
  ``use_fm=False`` and no linear columns is exactly this DNN);
* FuxiCTR 2.3.x: ``model.fit(train_gen, epochs=1, validation_data=valid_512_gen)`` with FuxiCTR's
  own DNN and ``RankDataLoader`` over npz files (needs ``polars==1.44.2``).

Epoch calls alternate between the libraries (one warm-up call each, not counted); the median is
reported as samples/s with ratios. The roofline: the cores' fp32 matmul rate, measured in the same
run on the MLP's own shapes, divided by the network's ~2.3 MFLOP per sample (forward + backward,
``6 × Σ in·out``); each library's samples/s is also given as a share of it. ``--precision bf16``
trains fastkd's model under bf16 autocast (the others stay fp32). ``--embedding`` picks fastkd's
embedding backward: ``dense`` (default; Adam), ``sparse`` (SparseAdam), ``fused`` (Adagrad inside
the backward, lr 0.05) or ``all`` (one fastkd model per mode, calls interleaved). Libraries not installed are
skipped. Which CPU ran it is printed first (model name and AMX/AVX-512 flags).

    python bench/student_throughput.py [--epochs 3] [--threads 2] [--precision fp32|bf16]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastkd import TrainConfig
from fastkd.data import load, make_synthetic
from fastkd.models import build_model
from fastkd.train import train_model

FRAPPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "frappe"
HIDDEN, EMBED, BATCH = (400, 400, 400), 16, 2048
EMBEDDING = {"dense": {}, "sparse": {"sparse": True}, "fused": {"fused_optimizer": "adagrad", "lr": 0.05}}


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = next((l for l in info.splitlines() if l.startswith("flags")), "")
    feats = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{model} ({', '.join(feats) or 'no AVX-512/AMX'})"


def flops_per_sample(n_fields: int) -> float:
    dims = [n_fields * EMBED, *HIDDEN, 1]
    return 6.0 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def matmul_rate(dtype=torch.float32, reps: int = 20) -> float:
    """FLOP/s of the MLP's forward matmuls at batch 2048 (the best of ``reps`` rounds)."""
    a = torch.randn(BATCH, 400, dtype=dtype)
    w = torch.randn(400, 400, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ w
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2.0 * BATCH * 400 * 400 / best


def deepctr_epoch(fs, train):
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    cols = [SparseFeat(f"f{i}", vocabulary_size=s, embedding_dim=EMBED) for i, s in enumerate(fs)]
    model = DeepFM([], cols, use_fm=False, dnn_hidden_units=HIDDEN, dnn_dropout=0.1, dnn_use_bn=True,
                   l2_reg_embedding=0.0, l2_reg_linear=0.0, device="cpu")
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "binary_crossentropy")
    x = {f"f{i}": train.ids[:, i] for i in range(len(fs))}
    y = train.labels.astype(np.float32)
    return lambda: model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


def fuxictr_epoch(train, valid, root: str):
    sys.path.insert(0, str(Path(__file__).parent))
    from integration_frappe import fuxictr_data, fuxictr_dnn_class

    fm, (train_gen, valid_gen, _) = fuxictr_data(train, valid, valid, root, EMBED, BATCH)
    model = fuxictr_dnn_class()(fm, model_id="throughput", embedding_dim=EMBED, hidden_units=HIDDEN,
                                net_dropout=0.1, batch_norm=True, learning_rate=1e-3, optimizer="adam",
                                loss="binary_crossentropy", verbose=0, model_root=root, metrics=["AUC"],
                                monitor="AUC", early_stop_patience=100)
    return lambda: model.fit(train_gen, epochs=1, validation_data=valid_gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--embedding", choices=tuple(EMBEDDING) + ("all",), default="dense")
    args = ap.parse_args()
    from fastkd.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as the fastkd CLI does; process-wide, so the other libraries get it too
    torch.set_num_threads(args.threads)
    if FRAPPE.exists():
        data = load(f"libfm:{FRAPPE / 'frappe.validation.libfm.gz'},{FRAPPE / 'frappe.test.libfm.gz'}")
        name = "Frappe"
    else:
        data, name = make_synthetic(86_582, n_fields=10, seed=0), "synthetic"
    train, valid, _ = data.split((0.8, 0.1, 0.1), seed=0)
    valid = valid.subset(np.arange(512))
    fs, n = train.field_sizes, len(train)

    cfg = TrainConfig(max_epochs=1, batch_size=BATCH, reduce_lr_on_plateau=False, progress=False,
                      precision=args.precision, monitor_window=1)
    epochs = {}
    for mode in (EMBEDDING if args.embedding == "all" else [args.embedding]):
        torch.manual_seed(0)
        fk = build_model("dnn", fs, dropout=0.1, hidden_units=HIDDEN, embed_dim=EMBED,
                         embedding_options=EMBEDDING[mode])
        epochs[f"fastkd ({args.precision}, {mode})"] = lambda fk=fk: train_model(fk, train, valid, cfg)
    tmp = tempfile.TemporaryDirectory()
    for label, make in (("DeepCTR-Torch", lambda: deepctr_epoch(fs, train)),
                        ("FuxiCTR", lambda: fuxictr_epoch(train, valid, tmp.name))):
        try:
            epochs[label] = make()
        except ImportError as exc:
            print(f"({label} skipped: {exc})")
    times = {k: [] for k in epochs}
    for e in range(args.epochs + 1):  # call 0 of each warms up and is not counted
        for k, fn in epochs.items():
            t0 = time.perf_counter()
            fn()
            if e:
                times[k].append(time.perf_counter() - t0)
    rate = matmul_rate()
    roof = rate / flops_per_sample(len(fs))
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{name}: {n:,} training rows, batch {BATCH}; fp32 matmul {rate / 1e9:.1f} GFLOP/s -> roofline "
          f"{roof:,.0f} samples/s at {flops_per_sample(len(fs)) / 1e6:.2f} MFLOP/sample")
    base = {k: n / statistics.median(v) for k, v in times.items()}
    fk_rate = base[next(iter(base))]
    for k, r in base.items():
        ratio = "" if k.startswith("fastkd") else f"; first fastkd row / {k}: {fk_rate / r:.2f}x"
        print(f"  {k:18s} {r:10,.0f} samples/s  ({100 * r / roof:.0f}% of roofline; median of "
              f"{len(times[k])} epoch calls{ratio})")
    tmp.cleanup()


if __name__ == "__main__":
    main()

"""Cost of a pre-train distillation epoch relative to a plain student epoch, side by side.

Both runs train the same student architecture on the same data with the same batch size; the
distillation run reads M cached teacher logits per sample and adds the gated loss. Runs are
interleaved (plain, distill, plain, distill, ...) and the median epoch time of each is compared,
so drift in the shared machine's speed hits both alike. The teacher cache is built once before
the first distillation epoch; its cost is reported separately.

    python bench/epoch_cost.py [--data frappe|synthetic] [--epochs 3] [--repeats 2]
"""
import argparse
import statistics
from pathlib import Path

import torch

from fastkd import Distiller, TrainConfig
from fastkd.data import load, make_synthetic
from fastkd.models import build_model
from fastkd.train import train_model

FRAPPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "frappe"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=("frappe", "synthetic"), default="frappe")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gate", default="logit")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.data == "frappe" and FRAPPE.exists():
        spec = f"libfm:{FRAPPE / 'frappe.validation.libfm.gz'},{FRAPPE / 'frappe.test.libfm.gz'}"
        data = load(spec)
    else:
        data = make_synthetic(86_582, seed=0)
    train, valid, _ = data.split((0.8, 0.1, 0.1), seed=0)
    fs = train.field_sizes
    # no early stopping inside the timed epochs: patience above the epoch count
    cfg = TrainConfig(max_epochs=args.epochs, patience=args.epochs + 1, progress=False)
    teachers = [build_model(n, fs) for n in ("deepfm", "dcn", "xdeepfm")]  # untrained: speed only
    plain_t, kd_t, cache_t = [], [], []
    for r in range(args.repeats):
        torch.manual_seed(r)
        s = train_model(build_model("dnn", fs), train, valid, cfg)
        plain_t += [h["train_seconds"] for h in s["history"]]
        torch.manual_seed(r)
        kd = Distiller(teachers, build_model("dnn", fs), gate=args.gate, config=cfg, teachers_trained=True)
        out = kd.fit(train, valid)
        kd_t += [h["train_seconds"] for h in out["student"]["history"]]
        cache_t.append(out["cache_seconds"])
    p, k = statistics.median(plain_t), statistics.median(kd_t)
    n = len(train)
    print(f"data: {args.data}, {n:,} training rows, batch {cfg.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"plain student epoch        median {p:.2f} s  ({n / p:,.0f} samples/s)  over {len(plain_t)} epochs")
    print(f"distillation epoch ({args.gate:5s}) median {k:.2f} s  ({n / k:,.0f} samples/s)  over {len(kd_t)} epochs")
    print(f"ratio distill / plain: {k / p:.3f}   (teacher cache, once: {statistics.median(cache_t):.2f} s)")


if __name__ == "__main__":
    main()

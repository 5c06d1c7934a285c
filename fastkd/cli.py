"""Command-line entry point: ``fastkd demo`` (and, with the training path, ``fastkd distill``)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional


def _loss_demo(args) -> int:
    """Distil a fixed ensemble of three teachers into a small student on generated data.

    Each teacher sees the hidden click model well on one region of the input space and badly
    elsewhere, so the per-sample teacher gate has something to learn. Student and baseline get
    the same architecture, steps and learning rate; only the loss differs.
    """
    import torch

    from . import GatedDistillLoss
    from .metrics import log_loss, roc_auc

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n, d = 30_000, 16
    x = torch.randn(n, d, generator=g)
    true = x[:, 0] * x[:, 1] + 0.8 * x[:, 2] - 0.5 * x[:, 3] * x[:, 4] + 0.5 * torch.sin(2 * x[:, 5])
    y = torch.bernoulli(torch.sigmoid(true), generator=g)
    region = (x[:, 6] > 0).long() + (x[:, 7] > 0).long()  # 0, 1, 2: where each teacher is good
    noise = torch.randn(n, 3, generator=g)
    good = torch.nn.functional.one_hot(region, 3).bool()
    teachers = true.unsqueeze(1) + torch.where(good, 0.2, 1.5) * noise
    tr, te = slice(0, 24_000), slice(24_000, n)

    def train(distill: bool):
        torch.manual_seed(args.seed)
        student = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        crit = GatedDistillLoss(3, temperature=1.0)
        bce = torch.nn.BCEWithLogitsLoss()
        opt = torch.optim.Adam(list(student.parameters()) + list(crit.parameters()), lr=3e-3)
        curve = []
        for epoch in range(args.epochs):
            perm = torch.randperm(24_000)
            total = 0.0
            for i in range(0, 24_000, 256):
                idx = perm[i:i + 256]
                z = student(x[tr][idx]).squeeze(1)
                loss = crit(z, teachers[tr][idx], y[tr][idx]) if distill else bce(z, y[tr][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
            curve.append(total / 24_000)
        with torch.no_grad():
            z = student(x[te]).squeeze(1)
            crit(z, teachers[te], y[te])
        return curve, z, crit.last_alpha

    print("fastkd loss demo: 3 fixed teachers, each good on one region; student MLP 16-32-1")
    t0 = time.time()
    base_curve, z_base, _ = train(distill=False)
    kd_curve, z_kd, alpha = train(distill=True)
    print("epoch  label-only loss  gated-KD loss")
    for e, (a, b) in enumerate(zip(base_curve, kd_curve)):
        print(f"{e + 1:5d}  {a:15.4f}  {b:13.4f}")
    yt = y[te].numpy()
    rows = [("teacher " + str(i), teachers[te][:, i]) for i in range(3)]
    rows += [("teacher mean", teachers[te].mean(1)), ("student, labels only", z_base), ("student, gated KD", z_kd)]
    print(f"\n{'model':22s} {'test AUC':>8s} {'logloss':>8s}")
    for name, z in rows:
        print(f"{name:22s} {roc_auc(yt, z.numpy()):8.4f} {log_loss(yt, torch.sigmoid(z).numpy()):8.4f}")
    by_region = [alpha[region[te] == r].mean(0).tolist() for r in range(3)]
    print("\nmean gate weight per region (rows: region, cols: teacher):")
    for r, w in enumerate(by_region):
        print(f"  region {r}: " + "  ".join(f"{v:.2f}" for v in w))
    print(f"\ndone in {time.time() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd", description="Ensemble knowledge distillation for CTR prediction")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in demonstration")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_loss_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

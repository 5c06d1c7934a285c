"""CPU training step of a multi-field embedding: fastkd vs per-field nn.Embedding vs one EmbeddingBag.

One step = forward of a ``[B, F]`` batch, backward of a random upstream gradient, and the
Adagrad update of the table. Providers, all with Adagrad (lr 0.01):

* ``per-field sparse``: one ``nn.Embedding(sparse=True)`` per field + ``torch.optim.Adagrad``
  (the best per-field configuration for large tables, the baseline of the issue's target);
* ``per-field dense``: the same with dense gradients (foreach Adagrad), only where the tables are
  small enough for it to be a contender (total rows <= --dense-max-rows);
* ``one EmbeddingBag``: a single ``nn.EmbeddingBag(sparse=True)`` over the fused table, bags of
  one id, + ``torch.optim.Adagrad``;
* ``fastkd sparse``: ``MultiFieldEmbedding(sparse=True)`` (merged sparse grad) + ``torch.optim.Adagrad``;
* ``fastkd fused``: ``MultiFieldEmbedding(fused_optimizer="adagrad")``, the update in backward.

Ids are uniform per field (each field owns rows/F rows). Within a configuration the providers run
in turn, round after round, and the median step time of each is reported, then fastkd fused's
speed-up over per-field sparse + Adagrad (the issue's baseline; by median, and by fastest step,
the steadier estimate on a loaded machine) and over the best per-field configuration. The machine is usually shared: compare ratios
from one run, not absolute times across runs.

    python bench/embedding_step.py [--threads 1] [--rounds 7] [--rows 1e5 1e6 1e7]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from fastkd.embedding import MultiFieldEmbedding

LR = 0.01


def field_sizes(rows: int, F: int):
    base = rows // F
    return [base + (1 if f < rows - base * F else 0) for f in range(F)]


class PerField:
    def __init__(self, fs, dim, sparse):
        self.tables = nn.ModuleList(nn.Embedding(s, dim, sparse=sparse) for s in fs)
        self.opt = torch.optim.Adagrad(self.tables.parameters(), lr=LR)

    def step(self, ids, up):
        out = torch.stack([t(ids[:, f]) for f, t in enumerate(self.tables)], 1)
        out.backward(up)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class OneBag:
    def __init__(self, fs, dim):
        self.bag = nn.EmbeddingBag(sum(fs), dim, mode="sum", sparse=True)
        self.opt = torch.optim.Adagrad(self.bag.parameters(), lr=LR)
        sizes = torch.tensor(fs)
        self.off = torch.cumsum(sizes, 0) - sizes

    def step(self, ids, up):
        flat = (ids + self.off).reshape(-1)
        out = self.bag(flat, torch.arange(flat.numel())).view(*ids.shape, -1)
        out.backward(up)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Fastkd:
    def __init__(self, fs, dim, fused):
        if fused:
            self.emb = MultiFieldEmbedding(fs, dim, fused_optimizer="adagrad", lr=LR)
            self.opt = None
        else:
            self.emb = MultiFieldEmbedding(fs, dim, sparse=True)
            self.opt = torch.optim.Adagrad(self.emb.parameters(), lr=LR)

    def step(self, ids, up):
        self.emb(ids).backward(up)
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def run_config(B, F, dim, rows, rounds, dense_max_rows, gen):
    fs = field_sizes(rows, F)
    ids = torch.stack([torch.randint(0, s, (B,), generator=gen) for s in fs], 1)
    up = torch.randn(B, F, dim, generator=gen)
    providers = {"per-field sparse": lambda: PerField(fs, dim, True)}
    if rows <= dense_max_rows:
        providers["per-field dense"] = lambda: PerField(fs, dim, False)
    providers.update({
        "one EmbeddingBag": lambda: OneBag(fs, dim),
        "fastkd sparse": lambda: Fastkd(fs, dim, False),
        "fastkd fused": lambda: Fastkd(fs, dim, True),
    })
    built = {name: make() for name, make in providers.items()}
    for p in built.values():  # warm-up: allocator, optimizer state
        p.step(ids, up)
        p.step(ids, up)
    times = {name: [] for name in built}
    for _ in range(rounds):
        for name, p in built.items():
            t0 = time.perf_counter()
            p.step(ids, up)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    low = {name: min(t) * 1e3 for name, t in times.items()}
    return med, low


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--fields", type=int, nargs="+", default=[10, 26, 39])
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--rows", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    ap.add_argument("--max-table-elems", type=float, default=2e8,
                    help="skip configurations whose table has more rows*dim (all providers hold "
                         "a table and an Adagrad state at once: 2e8 elems = ~8 GB in total)")
    ap.add_argument("--dense-max-rows", type=float, default=1e6)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={args.batch}, Adagrad lr={LR}; "
          "median ms per step; then the fused speed-up over per-field sparse + Adagrad (by median "
          "and by fastest step) and over the best per-field configuration")
    for rows in args.rows:
        rows = int(rows)
        for dim in args.dims:
            if rows * dim > args.max_table_elems:
                print(f"rows={rows:.0e} dim={dim}: skipped (table over --max-table-elems)")
                continue
            for F in args.fields:
                med, low = run_config(args.batch, F, dim, rows, args.rounds,
                                      args.dense_max_rows, gen)
                best = min((k for k in med if k.startswith("per-field")), key=med.get)
                fused = "fastkd fused"
                parts = "  ".join(f"{k} {v:6.1f}" for k, v in med.items())
                parts += (f" | fused: {med['per-field sparse'] / med[fused]:4.2f}x per-field sparse"
                          f" ({low['per-field sparse'] / low[fused]:4.2f}x by min), "
                          f"{med[best] / med[fused]:4.2f}x best per-field ({best.split()[-1]})")
                print(f"rows={rows:.0e} dim={dim:3d} F={F:2d} | {parts}", flush=True)


if __name__ == "__main__":
    main()

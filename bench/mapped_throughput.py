"""Training throughput from the memory-mapped cache against the in-memory path, same run (issue 16).

Frappe (or a synthetic stand-in), split 80/10/10; the same DNN trained one epoch at a time from
``load(...).split(...)`` (arrays in memory) and from ``cached_split(...)`` (memory-mapped
``.npy`` files), alternating, with ``merge_validation`` on as ``fastkd distill`` trains students
(the merged set is a ``Rows`` view over the mapped files, not a copy). Each call is a whole
``train_model`` epoch including its batch gathers; medians of ``--epochs`` calls after one warm-up
each. The cache is built in a temporary folder first (not timed).

    python bench/mapped_throughput.py [--epochs 5] [--threads 2]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastkd import TrainConfig
from fastkd.data import cached_split, load
from fastkd.models import build_model
from fastkd.train import train_model

FRAPPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "frappe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = f"libfm:{FRAPPE / 'frappe.validation.libfm.gz'},{FRAPPE / 'frappe.test.libfm.gz'}"
    mem = load(spec).split((0.8, 0.1, 0.1), seed=0)
    tmp = tempfile.TemporaryDirectory()
    mapped, _, _ = cached_split(spec, tmp.name)
    cfg = TrainConfig(max_epochs=1, batch_size=2048, reduce_lr_on_plateau=False, progress=False,
                      merge_validation=True, monitor_window=1)
    models = {}
    for name in ("in memory", "memory-mapped"):
        torch.manual_seed(0)
        models[name] = build_model("dnn", mem[0].field_sizes, dropout=0.1)
    data = {"in memory": mem, "memory-mapped": mapped}
    times = {k: [] for k in models}
    for e in range(args.epochs + 1):
        for k, m in models.items():
            t0 = time.perf_counter()
            train_model(m, data[k][0], data[k][1], cfg)
            if e:
                times[k].append(time.perf_counter() - t0)
    n = len(mem[0]) + len(mem[1]) // 2
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"Frappe: {n:,} training rows (merged validation), batch 2048, {torch.get_num_threads()} threads, "
          f"medians of {args.epochs} epoch calls")
    for k, r in rate.items():
        print(f"  {k:14s} {r:10,.0f} samples/s")
    print(f"  memory-mapped / in memory: {rate['memory-mapped'] / rate['in memory']:.3f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()

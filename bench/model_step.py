"""Train-step throughput of a CTR model on synthetic Frappe-shaped data.

Usage::

    python bench/model_step.py                     # DNN student, 2 threads, batch 2048
    python bench/model_step.py --tune-malloc       # + fastkd.allocator.tune_cpu_allocator
    python bench/model_step.py --model deepfm --threads 4

One step is forward + BCE + backward + Adam. The step is timed in short windows and the best
and median window are reported: on a shared machine the best window estimates the uncontended
speed and the median shows what contention costs.
"""
from __future__ import annotations

import argparse
import time
from typing import List

import torch
import torch.nn.functional as F

from fastkd.allocator import tune_cpu_allocator
from fastkd.models import build_model
from fastkd.models.base import FastDropout, ReLUDropout

FRAPPE_FIELD_SIZES = (957, 4082, 7, 7, 2, 3, 2, 9, 80, 233)


def main(argv: List[str] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dnn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--sparse", action="store_true", help="sparse embedding grads + SparseAdam")
    p.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True)")
    p.add_argument("--dropout-impl", choices=("fused", "fast", "torch"), default="fused",
                   help="fused: ReLUDropout (default); fast: ReLU + FastDropout; "
                        "torch: ReLU + nn.Dropout")
    p.add_argument("--embedding-backward", choices=("index_add", "embedding"), default="index_add",
                   help="embedding: F.embedding (embedding_dense_backward) instead of index_select")
    p.add_argument("--tune-malloc", action="store_true", help="call tune_cpu_allocator() first")
    p.add_argument("--bf16-matmul", action="store_true",
                   help="torch.backends.mkldnn.matmul.fp32_precision = 'bf16' (lower precision)")
    p.add_argument("--no-mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    p.add_argument("--compile", action="store_true", help="torch.compile(model) (slow first steps)")
    a = p.parse_args(argv)

    if a.tune_malloc:
        tune_cpu_allocator()
    torch.set_num_threads(a.threads)
    if a.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    if a.bf16_matmul:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    torch.manual_seed(0)
    model = build_model(a.model, FRAPPE_FIELD_SIZES, sparse=a.sparse).train()
    if a.dropout_impl != "fused":
        for mod in list(model.modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, ReLUDropout):
                    drop = (FastDropout(child.p) if a.dropout_impl == "fast"
                            else torch.nn.Dropout(child.p))
                    setattr(mod, child_name, torch.nn.Sequential(torch.nn.ReLU(), drop))
    if a.embedding_backward == "embedding":
        emb = model.embedding
        emb.lookup = lambda flat_ids: F.embedding(flat_ids, emb.weight, sparse=emb.sparse)
    if a.sparse:
        emb = [model.embedding.weight]
        rest = [q for n, q in model.named_parameters() if n != "embedding.weight"]
        opts = [torch.optim.SparseAdam(emb, lr=1e-3),
                torch.optim.Adam(rest, lr=1e-3, fused=a.fused_adam or None)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=1e-3, fused=a.fused_adam or None)]

    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.stack([torch.randint(0, s, (a.batch,), generator=g) for s in FRAPPE_FIELD_SIZES], 1),
         torch.randint(0, 2, (a.batch,), generator=g).float())
        for _ in range(8)
    ]

    forward = torch.compile(model) if a.compile else model

    def run(k: int) -> float:
        t0 = time.perf_counter()
        for i in range(k):
            ids, y = batches[i % len(batches)]
            for o in opts:
                o.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(forward(ids), y).backward()
            for o in opts:
                o.step()
        return time.perf_counter() - t0

    run(10)  # warm-up: allocator, optimizer state, MKL
    rates = sorted(a.steps * a.batch / run(a.steps) for _ in range(a.windows))
    out = {"best": rates[-1], "median": rates[len(rates) // 2], "worst": rates[0]}
    flags = " ".join(f"--{k.replace('_', '-')}" for k, v in vars(a).items() if v is True)
    flags += f" dropout={a.dropout_impl} embedding_backward={a.embedding_backward}"
    print(f"{a.model} B={a.batch} threads={a.threads} {flags or '(defaults)'}: "
          f"best {out['best']:,.0f}  median {out['median']:,.0f}  worst {out['worst']:,.0f} samples/s")
    return out


if __name__ == "__main__":
    main()

"""Training step of a multi-field embedding (forward + backward + Adagrad update), side by side.

Providers, all Adagrad (lr 0.01) on the same ``[B, F]`` ids and upstream gradient:

* ``per-field``: one ``nn.Embedding(sparse=True)`` per field + ``torch.optim.Adagrad``;
* ``one-bag``: one ``nn.EmbeddingBag(sparse=True)`` over the fused table + ``torch.optim.Adagrad``;
* ``fastkd``: ``MultiFieldEmbedding(fused_optimizer="adagrad")`` (update inside backward);
* ``fastkd-det`` (GPU): the same with ``deterministic=True`` (sort-based merge);
* ``fbgemm-tbe`` (GPU, when ``fbgemm_gpu`` imports): FBGEMM's table-batched embedding with
  ``EXACT_ADAGRAD`` fused into its backward.

CPU cases are small enough for ``make bench``; ``bench/embedding_step.py`` is the full CPU grid
(B = 4096, F in {10, 26, 39}, dim in {16, 64}, 1e5-1e7 rows). The GPU cases are marked ``cuda``
(``bench/gpu_check.sh`` runs ``pytest bench -m cuda``); each timed call ends with
``torch.cuda.synchronize()`` and warm-up rounds keep Triton's JIT out of the timings.
``extra_info`` holds ``peak_mem_MB`` (GPU: peak allocation of one step above what was allocated
before it; the fused providers must stay far below the table size, ``table_MB``). After the timed
calls each fused provider is checked against per-field ``nn.Embedding`` + ``torch.optim.Adagrad``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fastkd.embedding import MultiFieldEmbedding
from helpers import requires_cuda

B = 4096
LR = 0.01
CPU_CASES = [(26, 16, 1_000_000), (39, 64, 100_000)]  # (F, dim, rows)
GPU_CASES = [(26, 16, 1_000_000), (26, 64, 1_000_000), (39, 16, 10_000_000), (39, 64, 10_000_000)]
CPU_PROVIDERS = ["per-field", "one-bag", "fastkd"]
GPU_PROVIDERS = ["per-field", "one-bag", "fastkd", "fastkd-det", "fbgemm-tbe"]


def step_inputs(F: int, dim: int, rows: int, device: str, seed: int = 0):
    """Field sizes (``rows`` split evenly), uniform ids ``[B, F]`` and an upstream gradient."""
    base = rows // F
    sizes = [base + (1 if f < rows - base * F else 0) for f in range(F)]
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, s, (B,), generator=g) for s in sizes], 1)
    up = torch.randn(B, F, dim, generator=g)
    return sizes, ids.to(device), up.to(device)


def _fbgemm_tbe(sizes, dim, device):
    try:  # module paths moved between fbgemm_gpu releases
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    except Exception as exc:  # ImportError, or a binary built for another torch
        pytest.skip(f"fbgemm_gpu unavailable: {exc}")
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(s, dim, EmbeddingLocation.DEVICE, ComputeDevice.CUDA) for s in sizes],
        optimizer=EmbOptimType.EXACT_ADAGRAD, learning_rate=LR, eps=1e-10,
        pooling_mode=PoolingMode.SUM).to(device)


def make_step(provider: str, sizes, dim: int, device: str):
    """A ``step(ids, up)`` callable and the module holding the trained table(s)."""
    if provider == "per-field":
        tables = nn.ModuleList(nn.Embedding(s, dim, sparse=True) for s in sizes).to(device)
        opt = torch.optim.Adagrad(tables.parameters(), lr=LR)

        def step(ids, up):
            torch.stack([t(ids[:, f]) for f, t in enumerate(tables)], 1).backward(up)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, tables
    if provider == "one-bag":
        bag = nn.EmbeddingBag(sum(sizes), dim, mode="sum", sparse=True).to(device)
        opt = torch.optim.Adagrad(bag.parameters(), lr=LR)
        sizes_t = torch.tensor(sizes, device=device)
        offsets = torch.cumsum(sizes_t, 0) - sizes_t
        starts = torch.arange(B * len(sizes), device=device)

        def step(ids, up):
            bag((ids + offsets).reshape(-1), starts).view(*ids.shape, dim).backward(up)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, bag
    if provider in ("fastkd", "fastkd-det"):
        emb = MultiFieldEmbedding(sizes, dim, fused_optimizer="adagrad", lr=LR,
                                  deterministic=provider == "fastkd-det").to(device)

        def step(ids, up):
            emb(ids).backward(up)
        return step, emb
    if provider == "fbgemm-tbe":
        tbe = _fbgemm_tbe(sizes, dim, device)
        F = len(sizes)
        bag_starts = torch.arange(B * F + 1, device=device)

        def step(ids, up):
            # table-major indices: table f's B ids, then table f+1's
            out = tbe(ids.t().reshape(-1).contiguous(), bag_starts)  # [B, F * dim]
            out.backward(up.reshape(B, F * dim))
        return step, tbe
    raise ValueError(provider)


def _check_fused_step(sizes, dim, device):
    """One fused step equals per-field nn.Embedding + torch.optim.Adagrad on the same start."""
    _, ids, up = step_inputs(len(sizes), dim, sum(sizes), device, seed=1)
    emb = MultiFieldEmbedding(sizes, dim, fused_optimizer="adagrad", lr=LR, init_std=1.0).to(device)
    tables = nn.ModuleList(nn.Embedding(s, dim, sparse=True) for s in sizes).to(device)
    with torch.no_grad():
        for f, t in enumerate(tables):
            t.weight.copy_(emb.field_weight(f))
    opt = torch.optim.Adagrad(tables.parameters(), lr=LR)
    emb(ids).backward(up)
    torch.stack([t(ids[:, f]) for f, t in enumerate(tables)], 1).backward(up)
    opt.step()
    torch.testing.assert_close(emb.weight, torch.cat([t.weight for t in tables]), rtol=1e-5, atol=1e-6)


def _run(benchmark, provider, F, dim, rows, device, rounds, warmup):
    benchmark.group = f"emb-step-{device}-F{F}-D{dim}-R{rows:.0e}"
    sizes, ids, up = step_inputs(F, dim, rows, device)
    step, _ = make_step(provider, sizes, dim, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    info = {"emb_provider": provider, "F": F, "dim": dim, "rows": rows,
            "table_MB": round(rows * dim * 4 / 2**20, 1)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        if device == "cuda":
            step(ids, up)
            sync()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(ids, up)
            sync()
            info["peak_mem_MB"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)

        def run():
            step(ids, up)
            sync()

        benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
        benchmark.extra_info.update(info)
        if provider.startswith("fastkd"):
            _check_fused_step(sizes[:3], dim, device)


@pytest.fixture
def one_thread():
    # One intra-op thread for every provider: on a small shared machine, spinning OpenMP
    # workers of several processes make multi-threaded CPU timings mostly noise.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("F, dim, rows", CPU_CASES)
def test_embedding_step_cpu(benchmark, one_thread, provider, F, dim, rows):
    _run(benchmark, provider, F, dim, rows, "cpu", rounds=5, warmup=1)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("F, dim, rows", GPU_CASES)
def test_embedding_step_cuda(benchmark, provider, F, dim, rows):
    _run(benchmark, provider, F, dim, rows, "cuda", rounds=20, warmup=3)

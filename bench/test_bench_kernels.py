"""Forward+backward of the gated distillation loss on a GPU: fastkd's fused Triton kernel vs the
eager reference vs ``torch.compile(reference)``.

Binary CTR logits, B in {4K, 64K, 1M}, M in {2, 4, 8}, logit gate and hidden gate (d = 128,
bf16 hidden vectors). Each timed call runs forward and backward and ends with
``torch.cuda.synchronize()`` (pytest-benchmark times on the host); warm-up rounds keep Triton's
JIT and inductor's compile out of the timings. Each test records in ``extra_info``:

* ``bytes``: what the op must move at least: read z_S, z_T, y (and h, w for the hidden gate),
  write d loss / d z_S and α. ``GB/s`` is that over the median time.
* ``floor_ms``: ``bytes`` over the device-to-device copy bandwidth measured in this session.
* ``peak_mem_MB``: ``torch.cuda.max_memory_allocated`` during one forward+backward, above
  what was allocated before it (inputs excluded).

Correctness is checked after the timed calls. Skips without CUDA. ``bench/gpu_check.sh`` runs it:

    pytest bench/test_bench_kernels.py -m cuda --benchmark-only --benchmark-json out.json
"""
from __future__ import annotations

import pytest
import torch

from helpers import requires_cuda
from fastkd.functional import gated_distill_loss
from fastkd.reference import gated_distill_loss_ref

pytestmark = [pytest.mark.cuda, requires_cuda]

BATCHES = [4096, 65536, 1 << 20]
TEACHERS = [2, 4, 8]
GATES = ["logit", "hidden"]
PROVIDERS = ["fastkd", "eager", "compile"]
HIDDEN_DIM = 128
ROUNDS = 20
WARMUP = 3

_compiled = {}


def bench_inputs(B: int, M: int, gate: str, seed: int = 0):
    """Inputs on the GPU: fp32 logits and labels, bf16 hidden vectors, fp32 gate parameters."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    zs = (torch.randn(B, device=dev, generator=g) * 2).requires_grad_()
    zt = torch.randn(B, M, device=dev, generator=g) * 2
    y = (torch.rand(B, device=dev, generator=g) < 0.3).float()
    h = None
    if gate == "hidden":
        h = torch.randn(B, M, HIDDEN_DIM, device=dev, generator=g).to(torch.bfloat16)
        w = torch.randn(M, HIDDEN_DIM, device=dev, generator=g) * HIDDEN_DIM ** -0.5
    else:
        w = torch.randn(M, device=dev, generator=g)
    b = torch.randn(M, device=dev, generator=g)
    kw = dict(gate=gate, gate_weight=w.requires_grad_(), gate_bias=b.requires_grad_(), temperature=2.0,
              hard_weight=1.0, kd_weight=1.0, gate_loss_weight=1.0)
    return zs, zt, y, h, kw


def bytes_moved(zs, zt, y, h, kw) -> int:
    def nbytes(t):
        return 0 if t is None else t.numel() * t.element_size()

    reads = nbytes(zs) + nbytes(zt) + nbytes(y) + nbytes(h) + nbytes(kw["gate_weight"]) + nbytes(kw["gate_bias"])
    writes = nbytes(zs) + zt.numel() * 4  # d loss / d z_S, α (fp32)
    return reads + writes


def _step(provider, gate):
    if provider == "fastkd":
        loss_fn = lambda *a, **k: gated_distill_loss(*a, **k)  # noqa: E731
    elif provider == "eager":
        loss_fn = lambda *a, **k: gated_distill_loss_ref(*a, **k)[0]  # noqa: E731
    else:
        if gate not in _compiled:  # one compiled function per gate; dynamic shapes after a recompile
            _compiled[gate] = torch.compile(lambda *a, **k: gated_distill_loss_ref(*a, **k)[0])
        loss_fn = _compiled[gate]

    def run(zs, zt, y, h, kw):
        loss = loss_fn(zs, zt, y, h, **kw)
        grads = torch.autograd.grad(loss, (zs, kw["gate_weight"], kw["gate_bias"]))
        torch.cuda.synchronize()
        return grads

    return run


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write), the memory-bound reference."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 10
    start.record()
    for _ in range(n):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / n
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 28) * 4 / seconds


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("M", TEACHERS)
@pytest.mark.parametrize("B", BATCHES, ids=["4K", "64K", "1M"])
@pytest.mark.parametrize("gate", GATES)
def test_gated_loss_fwd_bwd_cuda(benchmark, copy_bandwidth, provider, gate, B, M):
    benchmark.group = f"gated-{gate}-B{B}-M{M}"
    zs, zt, y, h, kw = bench_inputs(B, M, gate)
    run = _step(provider, gate)
    for _ in range(WARMUP):  # Triton JIT / inductor compile, outside the peak-memory window too
        run(zs, zt, y, h, kw)

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(zs, zt, y, h, kw)
    peak = torch.cuda.max_memory_allocated() - before

    grads = benchmark.pedantic(run, args=(zs, zt, y, h, kw), rounds=ROUNDS, warmup_rounds=1)

    nbytes = bytes_moved(zs, zt, y, h, kw)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        provider=provider, gate=gate, B=B, M=M, bytes=nbytes, peak_mem_MB=round(peak / 2**20, 2),
        **{"GB/s": round(nbytes / median / 1e9, 1)},
        floor_ms=round(nbytes / copy_bandwidth * 1e3, 4), copy_GBps=round(copy_bandwidth / 1e9, 1),
    )

    want = _step("eager", gate)(zs, zt, y, h, kw)
    for g, r in zip(grads, want):
        # d loss / d z_S is O(1/B) under reduction="mean": a small atol, rtol for the sums
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-3)

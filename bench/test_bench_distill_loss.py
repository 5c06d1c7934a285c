"""Forward+backward of ``distill_loss`` (single-teacher KD + hard-label loss): fastkd vs the
references, side by side.

CPU (``make bench``): both providers run plain PyTorch; fastkd's closed-form gradient (computed in
the forward pass) replaces autograd's graph through the reference. Binary CTR logits and 8
classes, B in {4096, 65536}. Compare the ratio within one run: absolute times on shared machines
are noise. Correctness is checked after each timed call.

CUDA (``cuda``-marked, skips without a GPU): fastkd's fused Triton kernel vs the eager reference vs
``torch.compile(reference)``, binary CTR logits, B in {4K, 64K, 1M}; timing and ``extra_info``
(bytes, GB/s, copy floor, peak memory) as in bench/loss_bench.py. ``bench/gpu_check.sh`` runs it:

    pytest bench/test_bench_distill_loss.py -m cuda --benchmark-only --benchmark-json out.json
"""
from __future__ import annotations

import pytest
import torch

from helpers import make_inputs, requires_cuda
from fastkd.functional import distill_loss
from fastkd.reference import distill_loss_ref
from loss_bench import PROVIDERS, cuda_step, fwd_bwd_cpu, fwd_bwd_cuda, nbytes

KW = dict(temperature=2.0, hard_weight=1.0, kd_weight=1.0)


# --------------------------------------------------------------------------------------------
# CPU: fastkd vs autograd through the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["reference", "fastkd"])
@pytest.mark.parametrize("C", [1, 8], ids=["binary", "classes8"])
@pytest.mark.parametrize("B", [4096, 65536])
def test_distill_loss_fwd_bwd(benchmark, provider, C, B):
    benchmark.group = f"distill-C{C}-B{B}"
    zs, zt, y, _ = make_inputs(B, 1, C)
    zs.requires_grad_()
    zt = zt[:, 0]
    reference = lambda: distill_loss_ref(zs, zt, y, **KW)  # noqa: E731
    loss = (lambda: distill_loss(zs, zt, y, **KW)) if provider == "fastkd" else reference
    fwd_bwd_cpu(benchmark, loss, reference, (zs,), atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# CUDA: the fused kernel vs eager vs torch.compile
# --------------------------------------------------------------------------------------------
BATCHES = [4096, 65536, 1 << 20]


def bench_inputs(B: int, seed: int = 0):
    """Inputs on the GPU: fp32 student and teacher logits, fp32 0/1 labels."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    zs = (torch.randn(B, device="cuda", generator=g) * 2).requires_grad_()
    zt = torch.randn(B, device="cuda", generator=g) * 2
    y = (torch.rand(B, device="cuda", generator=g) < 0.3).float()
    return zs, zt, y


def bytes_moved(zs, zt, y) -> int:
    return nbytes(zs) + nbytes(zt) + nbytes(y) + nbytes(zs)  # reads, then d loss / d z_S


def _step(provider):
    return cuda_step(provider, lambda zs, zt, y: distill_loss(zs, zt, y, **KW),
                     lambda zs, zt, y: distill_loss_ref(zs, zt, y, **KW), "distill", wrt=lambda zs, zt, y: (zs,))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B", BATCHES, ids=["4K", "64K", "1M"])
def test_distill_loss_fwd_bwd_cuda(benchmark, copy_bandwidth, provider, B):
    benchmark.group = f"distill-B{B}"
    args = bench_inputs(B)
    (grad,) = fwd_bwd_cuda(benchmark, copy_bandwidth, _step(provider), args, bytes_moved(*args),
                           provider=provider, op="distill", gate="-", B=B, M=1)
    # d loss / d z_S is O(1/B) under reduction="mean": a small atol, rtol for the rest
    torch.testing.assert_close(grad, _step("eager")(*args)[0], atol=1e-9, rtol=1e-3)

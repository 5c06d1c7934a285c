"""Forward+backward of ``gated_distill_loss`` (teacher-gated multi-teacher KD loss): fastkd vs the
references, side by side.

CPU (``make bench``): both providers run plain PyTorch; fastkd's closed-form gradients (computed in
the forward pass) replace autograd's graph through the reference. Compare the ratio within one
run: absolute times on shared machines are noise. Correctness is checked after each timed call.

CUDA (``cuda``-marked, skips without a GPU): fastkd's fused Triton kernel vs the eager reference vs
``torch.compile(reference)``. Binary CTR logits, B in {4K, 64K, 1M}, M in {2, 4, 8}, logit gate
and hidden gate (d = 128, bf16 hidden vectors); timing and ``extra_info`` (bytes, GB/s, copy
floor, peak memory) as in bench/loss_bench.py. Correctness is checked after the timed calls.
``bench/gpu_check.sh`` runs it:

    pytest bench/test_bench_gated_distill_loss.py -m cuda --benchmark-only --benchmark-json out.json
"""
from __future__ import annotations

import pytest
import torch

from helpers import gate_params, make_inputs, requires_cuda
from fastkd.functional import gated_distill_loss
from fastkd.reference import gated_distill_loss_ref
from loss_bench import PROVIDERS, cuda_step, fwd_bwd_cpu, fwd_bwd_cuda, nbytes

GATES = ["logit", "hidden"]


# --------------------------------------------------------------------------------------------
# CPU: fastkd vs autograd through the reference
# --------------------------------------------------------------------------------------------
SHAPES = [(4096, 3), (65536, 4)]


def _setup(B, M, gate):
    zs, zt, y, h = make_inputs(B, M, 1)
    zs.requires_grad_()
    w, b = gate_params(gate, M, 1)
    kw = dict(gate=gate, gate_weight=w, gate_bias=b, temperature=2.0)
    return zs, zt, y, h, w, b, kw


@pytest.mark.parametrize("provider", ["reference", "fastkd"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("B,M", SHAPES)
def test_gated_loss_fwd_bwd(benchmark, provider, gate, B, M):
    benchmark.group = f"gated-{gate}-B{B}-M{M}"
    zs, zt, y, h, w, b, kw = _setup(B, M, gate)
    reference = lambda: gated_distill_loss_ref(zs, zt, y, h, **kw)[0]  # noqa: E731
    loss = (lambda: gated_distill_loss(zs, zt, y, h, **kw)) if provider == "fastkd" else reference
    fwd_bwd_cpu(benchmark, loss, reference, (zs, w, b), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# CUDA: the fused kernel vs eager vs torch.compile
# --------------------------------------------------------------------------------------------
BATCHES = [4096, 65536, 1 << 20]
TEACHERS = [2, 4, 8]
HIDDEN_DIM = 128


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
    reads = nbytes(zs) + nbytes(zt) + nbytes(y) + nbytes(h) + nbytes(kw["gate_weight"]) + nbytes(kw["gate_bias"])
    writes = nbytes(zs) + zt.numel() * 4  # d loss / d z_S, α (fp32)
    return reads + writes


def _fastkd(zs, zt, y, h, kw):
    return gated_distill_loss(zs, zt, y, h, **kw)


def _reference(zs, zt, y, h, kw):
    return gated_distill_loss_ref(zs, zt, y, h, **kw)[0]


def _step(provider, gate):
    # one compiled reference per gate; gradients to the student logits and the gate parameters
    return cuda_step(provider, _fastkd, _reference, ("gated", gate),
                     wrt=lambda zs, zt, y, h, kw: (zs, kw["gate_weight"], kw["gate_bias"]))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("M", TEACHERS)
@pytest.mark.parametrize("B", BATCHES, ids=["4K", "64K", "1M"])
@pytest.mark.parametrize("gate", GATES)
def test_gated_loss_fwd_bwd_cuda(benchmark, copy_bandwidth, provider, gate, B, M):
    benchmark.group = f"gated-{gate}-B{B}-M{M}"
    zs, zt, y, h, kw = bench_inputs(B, M, gate)
    args = (zs, zt, y, h, kw)
    grads = fwd_bwd_cuda(benchmark, copy_bandwidth, _step(provider, gate), args, bytes_moved(*args),
                         provider=provider, gate=gate, B=B, M=M)
    want = _step("eager", gate)(*args)
    for g, r in zip(grads, want):
        # d loss / d z_S is O(1/B) under reduction="mean": a small atol, rtol for the sums
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-3)

"""``distill_loss`` (single-teacher KD + hard-label loss): the CPU path and the fused Triton kernel
(``fastkd/kernels/distill_loss.py``, marked ``loss_kernels``) against hand values, the oracle
``fastkd/reference/distill_loss.py`` and closed forms.

Without a GPU the kernel tests run on CPU tensors in Triton's interpreter (see tests/conftest.py);
with one, on CUDA tensors.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import (
    BACKENDS, DEVICE, REDUCTIONS, SHAPE_PARAMS, backend_device, make_inputs, sigmoid, softplus, to_device, with_value,
)
from fastkd.functional import distill_loss
from fastkd.reference import distill_loss_ref


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------
def test_distill_hand_values_binary():
    # zs = 0, zt = 0, y = 1, T = 1: CE(1, 0) = log 2 and CE(0.5, 0) = log 2.
    out = distill_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert out.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    # zs = 2, zt = -1, y = 0, T = 2, γ = 0.3, β = 0.7
    p = sigmoid(-0.5)
    want = 0.3 * softplus(2.0) + 0.7 * (softplus(1.0) - p * 1.0)
    out = distill_loss(torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.0]),
                       temperature=2.0, hard_weight=0.3, kd_weight=0.7)
    assert out.item() == pytest.approx(want, abs=1e-6)
    # t2_scale multiplies the KD term by T²
    out = distill_loss(torch.tensor([2.0]), torch.tensor([-1.0]), None, temperature=2.0, t2_scale=True)
    assert out.item() == pytest.approx(4 * (softplus(1.0) - p), abs=1e-5)


def test_distill_hand_values_classes():
    zs, zt = [1.0, 0.0, -1.0], [0.0, 2.0, 0.0]
    T = 2.0
    e = [math.exp(v / T) for v in zt]
    p = [v / sum(e) for v in e]
    lse_s = math.log(sum(math.exp(v / T) for v in zs))
    kd = -sum(pc * (zc / T - lse_s) for pc, zc in zip(p, zs))
    hard = -(zs[2] - math.log(sum(math.exp(v) for v in zs)))
    out = distill_loss(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([2]), temperature=T)
    assert out.item() == pytest.approx(hard + kd, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Values and gradients against the oracle, on both backends
# --------------------------------------------------------------------------------------------
# (backend, name, B, M, C): the torch path on every shape; the kernel on a single row, several
# programs (B = 37) and classes.
_ORACLE_CASES = [pytest.param("torch", *p, id=f"torch-{p[0]}") for p in SHAPE_PARAMS] + [
    pytest.param("triton", *p, id=f"triton-{p[0]}", marks=pytest.mark.loss_kernels)
    for p in [("single_row", 1, 1, 1), ("odd", 37, 1, 1), ("classes", 11, 1, 6)]
]


@pytest.mark.parametrize("backend,name,B,M,C", _ORACLE_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "kd_only"])
def test_distill_matches_oracle(backend, name, B, M, C, reduction, with_labels):
    # one body for both sides of the seam (see helpers.BACKENDS)
    zs, zt, y, _ = make_inputs(B, M, C)
    zs, zt, y = to_device(backend_device(backend), zs, zt[:, 0], y)
    zs.requires_grad_()
    y = y if with_labels else None
    kw = dict(temperature=3.0, hard_weight=0.4, kd_weight=2.0, reduction=reduction)
    out = distill_loss(zs, zt, y, **kw)
    ref = distill_loss_ref(zs, zt, y, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    go = torch.rand_like(out) + 0.5
    torch.testing.assert_close(torch.autograd.grad(out, zs, go)[0], torch.autograd.grad(ref, zs, go)[0],
                               atol=1e-6, rtol=1e-5)


@pytest.mark.loss_kernels
def test_distill_kernel_wide_rows_span_several_tiles():
    # C = 150 > MAX_BLOCK_C: the online log-sum-exp over several class tiles
    zs, zt, y, _ = make_inputs(5, 3, 150, scale=3.0, seed=7)
    zs, zt, y = to_device(DEVICE, zs, zt, y)
    zt = zt[:, 0]  # a strided teacher, as a slice of the gated test's [B, M, C] logits
    zs.requires_grad_()
    loss = distill_loss(zs, zt, y, temperature=2.0, reduction="none")
    ref = distill_loss_ref(zs, zt, y, temperature=2.0, reduction="none")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), zs)[0], torch.autograd.grad(ref.sum(), zs)[0])


# --------------------------------------------------------------------------------------------
# gradcheck (float64) of the closed-form Function, gradgradcheck of the oracle
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 4])
def test_distill_gradcheck(C):
    zs, zt, y, _ = make_inputs(6, 1, C, dtype=torch.float64)
    zs.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: distill_loss(z, zt[:, 0], y, temperature=0.7, reduction="none"), (zs,))


@pytest.mark.parametrize("C", [1, 3])
def test_oracle_gradgradcheck(C):
    zs, zt, y, _ = make_inputs(4, 2, C, dtype=torch.float64)
    zs.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda z: distill_loss_ref(z, zt[:, 0], y, temperature=2.0), (zs,))


def test_double_backward_is_refused_clearly():
    zs = torch.randn(4, requires_grad=True)
    loss = distill_loss(zs, torch.randn(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, zs, create_graph=True)


# --------------------------------------------------------------------------------------------
# Properties, extreme and non-finite values
# --------------------------------------------------------------------------------------------
def test_no_gradient_reaches_teacher():
    zs, zt, y, _ = make_inputs(9, 3, 1)
    zs.requires_grad_()
    zt.requires_grad_()
    loss = distill_loss(zs, zt[:, 0], y)
    assert torch.autograd.grad(loss, zt, allow_unused=True)[0] is None


@pytest.mark.parametrize("T", [0.05, 1.0, 100.0])
def test_extreme_logits_finite_and_correct_limits(T):
    big = 1e4
    zs = torch.tensor([big, -big, big, -big, 0.0], requires_grad=True)
    zt = torch.tensor([big, big, -big, -big, big])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    loss = distill_loss(zs, zt, y, temperature=T, hard_weight=0.0, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), zs)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    # agreeing saturated logits cost nothing; disagreeing ones cost |z_S|/T (softplus limit)
    torch.testing.assert_close(loss[[0, 3]], torch.zeros(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(loss[[1, 2]], torch.full((2,), big / T), rtol=1e-5, atol=0)
    p = torch.sigmoid(zt / T)
    torch.testing.assert_close(g, (torch.sigmoid(zs.detach() / T) - p) / T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logits_never_give_a_finite_loss(backend, C, bad):
    zs, zt, y, _ = make_inputs(4, 2, C)
    zs, zt, y = to_device(backend_device(backend), zs, zt, y)
    assert not torch.isfinite(distill_loss(zs, with_value(zt, (1, 0), bad)[:, 0], y))
    assert not torch.isfinite(distill_loss(with_value(zs, 2, bad), zt[:, 0], y))

"""Fused single-teacher KD loss: per-sample loss and d loss / d z_S in one pass.

Twin of :func:`fastkd.reference.distill_loss_fwd_ref` (same arguments, same outputs); the
dispatch seam ``fastkd._autograd._fwd_impl`` swaps one for the other. Inputs are loaded in their
native dtype (fp32/bf16/fp16) and computed in fp32; loss and gradient are returned in fp32.
Each program handles a tile of rows (CTR rows hold a single logit); C-class rows stream over the
classes with an online log-sum-exp, so any C works.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..loss_args import DistillLossArgs, op_signature
from . import _common
from ._common import lse_update, sigmoid, softplus

# Columns per class tile; wider rows loop over column tiles.
MAX_BLOCK_C = 128


# Binary (y the label, T the temperature, x = z_S / T, p = σ(z_T / T)):
#   loss = kd_weight·(softplus(x) − p·x) + hard_weight·(softplus(z_S) − y·z_S) + 0·z_T
#   d loss / d z_S = kd_weight·(σ(x) − p)/T + hard_weight·(σ(z_S) − y)
# The 0·z_T term makes a non-finite teacher logit give a non-finite loss, as in the reference.
@triton.jit
def _distill_loss_binary_fwd_kernel(
    zs_ptr,  # [B] student logits, native dtype
    zt_ptr,  # [B] teacher logits, native dtype
    y_ptr,  # [B] fp32 labels in [0, 1] (read only when HAS_HARD)
    loss_ptr,  # [B] fp32 per-sample loss (out)
    grad_ptr,  # [B] fp32 d loss_b / d z_S,b (out)
    B,
    inv_t,
    hard_weight,
    kd_weight,
    HAS_HARD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < B
    zs = tl.load(zs_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    zt = tl.load(zt_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    x = zs * inv_t
    p = sigmoid(zt * inv_t)
    loss = kd_weight * (softplus(x) - p * x) + 0.0 * zt
    grad = (kd_weight * inv_t) * (sigmoid(x) - p)
    if HAS_HARD:
        y = tl.load(y_ptr + rows, mask=mask, other=0.0)
        loss += hard_weight * (softplus(zs) - y * zs)
        grad += hard_weight * (sigmoid(zs) - y)
    tl.store(loss_ptr + rows, loss, mask=mask)
    tl.store(grad_ptr + rows, grad, mask=mask)


# C classes (x = z_S / T, p = softmax(z_T / T), lse the log-sum-exp over the classes):
#   loss = kd_weight·(lse(x)·Σp − Σ p·x) + hard_weight·(lse(z_S) − z_S,y) + 0·Σ z_T
#   d loss / d z_S,c = kd_weight·(softmax(x)_c − p_c)/T + hard_weight·(softmax(z_S)_c − [c = y])
# Pass 1 streams the classes once for the three running log-sum-exps and Σ p·x (rescaled online);
# pass 2 writes the gradient.
@triton.jit
def _distill_loss_classes_fwd_kernel(
    zs_ptr,  # [B, C] student logits, native dtype
    zt_ptr,  # [B, C] teacher logits, native dtype
    y_ptr,  # [B] int64 class labels (read only when HAS_HARD)
    loss_ptr,  # [B] fp32 per-sample loss (out)
    grad_ptr,  # [B, C] fp32 d loss_b / d z_S,b (out)
    B,
    C,
    inv_t,
    hard_weight,
    kd_weight,
    HAS_HARD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    base = rows[:, None] * C
    neg_inf = float("-inf")
    m_x = tl.full([BLOCK_B], neg_inf, tl.float32)
    l_x = tl.zeros([BLOCK_B], tl.float32)
    m_t = tl.full([BLOCK_B], neg_inf, tl.float32)
    l_t = tl.zeros([BLOCK_B], tl.float32)
    px = tl.zeros([BLOCK_B], tl.float32)  # Σ exp(z_T/T − m_t)·x, rescaled with m_t
    m_s = tl.full([BLOCK_B], neg_inf, tl.float32)
    l_s = tl.zeros([BLOCK_B], tl.float32)
    z_y = tl.zeros([BLOCK_B], tl.float32)
    guard = tl.zeros([BLOCK_B], tl.float32)
    if HAS_HARD:
        y = tl.load(y_ptr + rows, mask=rmask, other=0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols[None, :] < C)
        zs = tl.load(zs_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        guard += tl.sum(zt, 1)
        x = zs * inv_t
        m_x, l_x = lse_update(m_x, l_x, tl.where(mask, x, neg_inf))
        xt = tl.where(mask, zt * inv_t, neg_inf)
        m_new = tl.maximum(m_t, tl.max(xt, 1))
        scale = tl.exp(m_t - m_new)
        e = tl.exp(xt - m_new[:, None])
        l_t = l_t * scale + tl.sum(e, 1)
        px = px * scale + tl.sum(e * x, 1)
        m_t = m_new
        if HAS_HARD:
            m_s, l_s = lse_update(m_s, l_s, tl.where(mask, zs, neg_inf))
            z_y += tl.sum(tl.where(cols[None, :] == y[:, None], zs, 0.0), 1)
    lse_x = m_x + tl.log(l_x)
    lse_t = m_t + tl.log(l_t)
    # Σp is 1 up to rounding; the reference multiplies lse(x) by it, so do the same
    loss = kd_weight * (lse_x - px / l_t) + 0.0 * guard
    lse_s = m_s + tl.log(l_s)
    if HAS_HARD:
        loss += hard_weight * (lse_s - z_y)
    tl.store(loss_ptr + rows, loss, mask=rmask)

    kd_scale = kd_weight * inv_t
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols[None, :] < C)
        zs = tl.load(zs_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = kd_scale * (tl.exp(zs * inv_t - lse_x[:, None]) - tl.exp(zt * inv_t - lse_t[:, None]))
        if HAS_HARD:
            onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
            g += hard_weight * (tl.exp(zs - lse_s[:, None]) - onehot)
        tl.store(grad_ptr + base + cols[None, :], g, mask=mask)


def _launch(student, teacher, labels, temperature, hard_weight, kd_weight, wrap):
    """Allocate, pick tiles, launch (``wrap`` None: allocate only, for fake tensors)."""
    zs = student.contiguous()
    zt = teacher.contiguous()
    B = zs.shape[0]
    has_hard = labels is not None and hard_weight != 0.0
    y = labels.contiguous() if has_hard else zs  # a dummy pointer when HAS_HARD is off
    loss = torch.empty(B, device=zs.device, dtype=torch.float32)
    grad = torch.empty(zs.shape, device=zs.device, dtype=torch.float32)
    if wrap is None:
        return loss, grad
    inv_t = 1.0 / temperature
    if zs.dim() == 1:
        block_b = _common.rows_per_program(1)
        grid = (triton.cdiv(B, block_b),)
        wrap(_distill_loss_binary_fwd_kernel)[grid](
            zs, zt, y, loss, grad, B, inv_t, hard_weight, kd_weight,
            HAS_HARD=has_hard, BLOCK_B=block_b,
        )
    else:
        C = zs.shape[1]
        block_c = min(_common.next_pow2(C), MAX_BLOCK_C)
        block_b = _common.rows_per_program(block_c)
        grid = (triton.cdiv(B, block_b),)
        wrap(_distill_loss_classes_fwd_kernel)[grid](
            zs, zt, y, loss, grad, B, C, inv_t, hard_weight, kd_weight,
            HAS_HARD=has_hard, BLOCK_B=block_b, BLOCK_C=block_c,
        )
    return loss, grad


_OUTPUTS = Tuple[torch.Tensor, torch.Tensor]  # (loss [B], grad), fp32
_OP = _common.register_op("fastkd::distill_loss_fwd", _launch,
                          op_signature(DistillLossArgs, _returns=_OUTPUTS))


def distill_loss_forward(a: DistillLossArgs) -> _OUTPUTS:
    """Per-sample loss [B] and d loss_b / d z_S,b ([B] or [B, C]), fp32, in one kernel launch.

    Same contract as :func:`fastkd.reference.distill_loss_fwd_ref`.
    """
    return _common.run_op(_OP, _launch, *a.values())

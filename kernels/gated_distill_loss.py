"""Fused teacher-gated multi-teacher KD loss: loss, student gradient and gate gradients in one pass.

Twin of :func:`fastkd.reference.gated_distill_loss_fwd_ref` (``gated_distill_loss_forward``, with
per-sample d loss / d s) and of :func:`fastkd.reference.gated_distill_loss_fwd_reduced_ref`
(``gated_distill_loss_forward_reduced``, with the gate-parameter gradients already summed over
the batch). Every gate ("logit", "hidden", "mean", "fixed"), both ensembles ("logit", "prob"),
binary logits and C classes (online log-sum-exp over column tiles, so any C works).

The gate-parameter gradients are reduced deterministically: each program writes the sum over
its own rows to a partials buffer [P, ...], then one small kernel sums the P rows in a fixed
order. No float atomics, so two runs give bit-identical gradients.

Over 400 lines on purpose: one op, whose binary and C-class kernels share the gate helpers and
one launcher; splitting them would put the two halves of one gradient in different files.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..loss_args import GatedDistillLossArgs, op_signature
from . import _common
from ._common import lse_update, sigmoid, softplus

# Widths of the hidden-vector and class tiles; wider rows loop over tiles.
MAX_BLOCK_D = 64
MAX_BLOCK_C = 64
GATES = ("logit", "hidden", "mean", "fixed")
ENSEMBLES = ("logit", "prob")


@triton.jit
def _hidden_gate_scores(h_ptr, w_ptr, rows, ms, mask, M, D, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # s_bm (bias excluded) = Σ_d h_bmd·w_md, over tiles of BLOCK_D features
    s = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(h_ptr + (rows[:, None, None] * M + ms[None, :, None]) * D + dd[None, None, :],
                    mask=mask[:, :, None] & dmask[None, None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ms[:, None] * D + dd[None, :], mask=(ms[:, None] < M) & dmask[None, :],
                    other=0.0).to(tl.float32)
        s += tl.sum(h * w[None, :, :], 2)
    return s


@triton.jit
def _accumulate(ptr, val, mask, t):
    # Partials row of this program only, updated tile after tile in program order: a plain
    # read-modify-write, no atomics. Tile t = 0 reads nothing, so the buffer needs no zeroing.
    tl.store(ptr, tl.load(ptr, mask=mask & (t > 0), other=0.0) + val, mask=mask)


@triton.jit
def _hidden_gate_partials(h_ptr, pw_ptr, pid, t, gs, rows, ms, mask, M, D, BLOCK_D: tl.constexpr):
    # this tile's share of dW_md = Σ_b g_bm·h_bmd, added to partials row `pid`
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(h_ptr + (rows[:, None, None] * M + ms[None, :, None]) * D + dd[None, None, :],
                    mask=mask[:, :, None] & dmask[None, None, :], other=0.0).to(tl.float32)
        _accumulate(pw_ptr + (pid * M + ms[:, None]) * D + dd[None, :], tl.sum(gs[:, :, None] * h, 0),
                    (ms[:, None] < M) & dmask[None, :], t)


@triton.jit
def _gate_softmax(s, mmask):
    s = tl.where(mmask[None, :], s, float("-inf"))
    e = tl.exp(s - tl.max(s, 1)[:, None])
    return e / tl.sum(e, 1)[:, None]


# Binary (x = z_S/T, y the label, α = softmax_i(s_i), m = Σ α_i z_Ti):
#   p    = σ(m/T)                       (ENSEMBLE "logit")   or  Σ α_i σ(z_Ti/T)   ("prob")
#   loss = kd_weight·(softplus(x) − p·x) + hard_weight·(softplus(z_S) − y·z_S)
#          + gate_loss_weight·(softplus(m) − y·m) [trainable gates] + 0·Σ z_T
#   d loss / d z_S = kd_weight·(σ(x) − p)/T + hard_weight·(σ(z_S) − y)       (α constant: stop-gradient)
#   d loss / d s_j = gate_loss_weight·α_j·(σ(m) − y)·(z_Tj − m)
#   d loss / d b_j = Σ_b d loss / d s_bj,  d loss / d w_j = Σ_b d loss / d s_bj · x_bj  (x = z_T or h_T)
@triton.jit
def _gated_distill_loss_binary_fwd_kernel(
    zs_ptr,  # [B] student logits, native dtype
    zt_ptr,  # [B, M] teacher logits, native dtype
    y_ptr,  # [B] fp32 labels (read when HAS_HARD or the gate is trainable)
    h_ptr,  # [B, M, D] teacher hidden vectors (GATE == "hidden")
    w_ptr,  # [M] (GATE == "logit") or [M, D] (GATE == "hidden") gate weight
    b_ptr,  # [M] gate bias (trainable gates)
    fixed_ptr,  # [M] fixed teacher weights α (GATE == "fixed")
    loss_ptr,  # [B] fp32 per-sample loss (out)
    grad_ptr,  # [B] fp32 grad_scale · d loss_b / d z_S,b (out)
    gs_ptr,  # [B, M] fp32 d loss_b / d s_b (out, WRITE_GRAD_SCORES)
    alpha_ptr,  # [B, M] fp32 teacher weights α (out)
    pw_ptr,  # [P, M] or [P, M, D] fp32 per-program partial dW (out, REDUCE_GATE)
    pb_ptr,  # [P, M] fp32 per-program partial db (out, REDUCE_GATE)
    B,
    M,
    D,
    inv_t,
    hard_weight,
    kd_weight,
    gate_loss_weight,
    grad_scale,
    tiles_per_program,
    GATE: tl.constexpr,
    TRAINABLE: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HAS_GATE_TERM: tl.constexpr,
    WRITE_GRAD_SCORES: tl.constexpr,
    REDUCE_GATE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # several row tiles per program: the gate partials stay per program, a few per SM
    for t in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + t) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        ms = tl.arange(0, BLOCK_M)
        mmask = ms < M
        mask = rmask[:, None] & mmask[None, :]
        bm_off = rows[:, None] * M + ms[None, :]
        zt = tl.load(zt_ptr + bm_off, mask=mask, other=0.0).to(tl.float32)
        zs = tl.load(zs_ptr + rows, mask=rmask, other=0.0).to(tl.float32)

        if GATE == "logit":
            w = tl.load(w_ptr + ms, mask=mmask, other=0.0).to(tl.float32)
            bias = tl.load(b_ptr + ms, mask=mmask, other=0.0).to(tl.float32)
            alpha = _gate_softmax(zt * w[None, :] + bias[None, :], mmask)
        elif GATE == "hidden":
            bias = tl.load(b_ptr + ms, mask=mmask, other=0.0).to(tl.float32)
            s = _hidden_gate_scores(h_ptr, w_ptr, rows, ms, mask, M, D, BLOCK_B, BLOCK_M, BLOCK_D)
            alpha = _gate_softmax(s + bias[None, :], mmask)
        elif GATE == "mean":
            alpha = tl.where(mask, 1.0 / M, 0.0)
        else:
            a = tl.load(fixed_ptr + ms, mask=mmask, other=0.0).to(tl.float32)
            alpha = tl.where(mask, a[None, :], 0.0)

        mix = tl.sum(alpha * zt, 1)
        x = zs * inv_t
        if ENSEMBLE == "logit":
            p = sigmoid(mix * inv_t)
        else:
            p = tl.sum(alpha * sigmoid(zt * inv_t), 1)
        loss = kd_weight * (softplus(x) - p * x)
        grad = (kd_weight * inv_t) * (sigmoid(x) - p)
        if HAS_HARD or TRAINABLE:
            y = tl.load(y_ptr + rows, mask=rmask, other=0.0)
        if HAS_HARD:
            loss += hard_weight * (softplus(zs) - y * zs)
            grad += hard_weight * (sigmoid(zs) - y)
        if TRAINABLE:
            if HAS_GATE_TERM:
                loss += gate_loss_weight * (softplus(mix) - y * mix)
            r = sigmoid(mix) - y
            gs = gate_loss_weight * alpha * (r[:, None] * (zt - mix[:, None]))
            if WRITE_GRAD_SCORES:
                tl.store(gs_ptr + bm_off, gs, mask=mask)
            if REDUCE_GATE:
                gsr = tl.where(mask, gs * grad_scale, 0.0)
                _accumulate(pb_ptr + pid * M + ms, tl.sum(gsr, 0), mmask, t)
                if GATE == "logit":
                    _accumulate(pw_ptr + pid * M + ms, tl.sum(gsr * zt, 0), mmask, t)
                else:
                    _hidden_gate_partials(h_ptr, pw_ptr, pid, t, gsr, rows, ms, mask, M, D, BLOCK_D)
        loss += 0.0 * tl.sum(zt, 1)
        tl.store(loss_ptr + rows, loss, mask=rmask)
        tl.store(grad_ptr + rows, grad * grad_scale, mask=rmask)
        tl.store(alpha_ptr + bm_off, alpha, mask=mask)
        tl.debug_barrier()  # this tile's partial updates land before the next tile reads them


# C classes (x = z_S/T, softmax over classes, m_c = Σ α_i z_Ti,c, lse the log-sum-exp over c):
#   q    = softmax(m/T)                 (ENSEMBLE "logit")   or  Σ α_i softmax(z_Ti/T)   ("prob")
#   loss = kd_weight·(lse(x)·Σq − Σ q·x) + hard_weight·(lse(z_S) − z_S,y)
#          + gate_loss_weight·(lse(m) − m_y) [trainable gates] + 0·Σ z_T
#   d loss / d z_S,c = kd_weight·(softmax(x)_c − q_c)/T + hard_weight·(softmax(z_S)_c − [c = y])
#   d loss / d s_j   = gate_loss_weight·α_j·(Σ_c r_c z_Tj,c − Σ_c r_c m_c),  r = softmax(m) − onehot(y)
# Pass 1 over the class tiles: gate scores (logit gate), the student's log-sum-exps and, for the
# prob ensemble, each teacher's log-sum-exp with Σ_c softmax(z_Ti/T)_c·x_c (rescaled online).
# Pass 2 (once α is known): the mixture's log-sum-exps and the sums the gate gradient needs.
# Pass 3: the student gradient and, for the class logit gate, the partial dW_ic = Σ_b g_bi z_Tbi,c.
@triton.jit
def _gated_distill_loss_classes_fwd_kernel(
    zs_ptr,  # [B, C] student logits, native dtype
    zt_ptr,  # [B, M, C] teacher logits, native dtype
    y_ptr,  # [B] int64 class labels (read when HAS_HARD or the gate is trainable)
    h_ptr,  # [B, M, D] teacher hidden vectors (GATE == "hidden")
    w_ptr,  # [M, C] (GATE == "logit") or [M, D] (GATE == "hidden") gate weight
    b_ptr,  # [M] gate bias (trainable gates)
    fixed_ptr,  # [M] fixed teacher weights α (GATE == "fixed")
    loss_ptr,  # [B] fp32 per-sample loss (out)
    grad_ptr,  # [B, C] fp32 grad_scale · d loss_b / d z_S,b (out)
    gs_ptr,  # [B, M] fp32 d loss_b / d s_b (out, WRITE_GRAD_SCORES)
    alpha_ptr,  # [B, M] fp32 teacher weights α (out)
    pw_ptr,  # [P, M, C] or [P, M, D] fp32 per-program partial dW (out, REDUCE_GATE)
    pb_ptr,  # [P, M] fp32 per-program partial db (out, REDUCE_GATE)
    B,
    M,
    C,
    D,
    inv_t,
    hard_weight,
    kd_weight,
    gate_loss_weight,
    grad_scale,
    tiles_per_program,
    GATE: tl.constexpr,
    TRAINABLE: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HAS_GATE_TERM: tl.constexpr,
    WRITE_GRAD_SCORES: tl.constexpr,
    REDUCE_GATE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    neg_inf = float("-inf")
    pid = tl.program_id(0).to(tl.int64)
    # several row tiles per program: the gate partials stay per program, a few per SM
    for t in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + t) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        ms = tl.arange(0, BLOCK_M)
        mmask = ms < M
        mask = rmask[:, None] & mmask[None, :]
        bm_off = rows[:, None] * M + ms[None, :]
        if HAS_HARD or TRAINABLE:
            y = tl.load(y_ptr + rows, mask=rmask, other=0)

        # ---- pass 1: student log-sum-exps, logit-gate scores, per-teacher log-sum-exps (prob) ----
        m_x = tl.full([BLOCK_B], neg_inf, tl.float32)
        l_x = tl.zeros([BLOCK_B], tl.float32)
        m_s = tl.full([BLOCK_B], neg_inf, tl.float32)
        l_s = tl.zeros([BLOCK_B], tl.float32)
        zs_y = tl.zeros([BLOCK_B], tl.float32)
        guard = tl.zeros([BLOCK_B], tl.float32)
        s = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
        m_tm = tl.full([BLOCK_B, BLOCK_M], neg_inf, tl.float32)
        l_tm = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
        px_m = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)  # Σ_c exp(z_Ti,c/T − m_tm)·x_c
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            smask = rmask[:, None] & cmask[None, :]
            zs = tl.load(zs_ptr + rows[:, None] * C + cols[None, :], mask=smask, other=0.0).to(tl.float32)
            x = zs * inv_t
            m_x, l_x = lse_update(m_x, l_x, tl.where(smask, x, neg_inf))
            if HAS_HARD:
                m_s, l_s = lse_update(m_s, l_s, tl.where(smask, zs, neg_inf))
                zs_y += tl.sum(tl.where(cols[None, :] == y[:, None], zs, 0.0), 1)
            tmask = mask[:, :, None] & cmask[None, None, :]
            zt = tl.load(zt_ptr + bm_off[:, :, None] * C + cols[None, None, :], mask=tmask, other=0.0).to(tl.float32)
            guard += tl.sum(tl.sum(zt, 2), 1)
            if GATE == "logit":
                w = tl.load(w_ptr + ms[:, None] * C + cols[None, :], mask=mmask[:, None] & cmask[None, :],
                            other=0.0).to(tl.float32)
                s += tl.sum(zt * w[None, :, :], 2)
            if ENSEMBLE == "prob":
                xt = tl.where(tmask, zt * inv_t, neg_inf)
                m_tm_new = tl.maximum(m_tm, tl.max(xt, 2))
                scale_t = tl.exp(m_tm - m_tm_new)
                e_t = tl.exp(xt - m_tm_new[:, :, None])
                l_tm = l_tm * scale_t + tl.sum(e_t, 2)
                px_m = px_m * scale_t + tl.sum(e_t * x[:, None, :], 2)
                m_tm = m_tm_new
        lse_x = m_x + tl.log(l_x)
        lse_s = m_s + tl.log(l_s)

        if GATE == "logit":
            bias = tl.load(b_ptr + ms, mask=mmask, other=0.0).to(tl.float32)
            alpha = _gate_softmax(s + bias[None, :], mmask)
        elif GATE == "hidden":
            bias = tl.load(b_ptr + ms, mask=mmask, other=0.0).to(tl.float32)
            s = _hidden_gate_scores(h_ptr, w_ptr, rows, ms, mask, M, D, BLOCK_B, BLOCK_M, BLOCK_D)
            alpha = _gate_softmax(s + bias[None, :], mmask)
        elif GATE == "mean":
            alpha = tl.where(mask, 1.0 / M, 0.0)
        else:
            a = tl.load(fixed_ptr + ms, mask=mmask, other=0.0).to(tl.float32)
            alpha = tl.where(mask, a[None, :], 0.0)
        # masked teachers must not turn 0·(−inf) into NaN below
        lse_tm = tl.where(mask, m_tm + tl.log(l_tm), 0.0)

        # ---- pass 2: the mixture m = Σ α_i z_Ti (logit ensemble target, gate term) ----
        m_q = tl.full([BLOCK_B], neg_inf, tl.float32)
        l_q = tl.zeros([BLOCK_B], tl.float32)
        qx = tl.zeros([BLOCK_B], tl.float32)  # Σ_c exp(m_c/T − m_q)·x_c
        m_g = tl.full([BLOCK_B], neg_inf, tl.float32)
        l_g = tl.zeros([BLOCK_B], tl.float32)
        em = tl.zeros([BLOCK_B], tl.float32)  # Σ_c exp(m_c − m_g)·m_c
        ez = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)  # Σ_c exp(m_c − m_g)·z_Ti,c
        mix_y = tl.zeros([BLOCK_B], tl.float32)
        zt_y = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
        if ENSEMBLE == "logit" or TRAINABLE:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                cmask = cols < C
                smask = rmask[:, None] & cmask[None, :]
                tmask = mask[:, :, None] & cmask[None, None, :]
                zt = tl.load(zt_ptr + bm_off[:, :, None] * C + cols[None, None, :], mask=tmask,
                             other=0.0).to(tl.float32)
                mix = tl.sum(alpha[:, :, None] * zt, 1)
                if ENSEMBLE == "logit":
                    zs = tl.load(zs_ptr + rows[:, None] * C + cols[None, :], mask=smask, other=0.0).to(tl.float32)
                    xq = tl.where(smask, mix * inv_t, neg_inf)
                    m_q_new = tl.maximum(m_q, tl.max(xq, 1))
                    scale_q = tl.exp(m_q - m_q_new)
                    e_q = tl.exp(xq - m_q_new[:, None])
                    l_q = l_q * scale_q + tl.sum(e_q, 1)
                    qx = qx * scale_q + tl.sum(e_q * (zs * inv_t), 1)
                    m_q = m_q_new
                if TRAINABLE:
                    xg = tl.where(smask, mix, neg_inf)
                    m_g_new = tl.maximum(m_g, tl.max(xg, 1))
                    scale_g = tl.exp(m_g - m_g_new)
                    e_g = tl.exp(xg - m_g_new[:, None])
                    l_g = l_g * scale_g + tl.sum(e_g, 1)
                    em = em * scale_g + tl.sum(e_g * mix, 1)
                    ez = ez * scale_g[:, None] + tl.sum(e_g[:, None, :] * zt, 2)
                    m_g = m_g_new
                    is_y = cols[None, :] == y[:, None]
                    mix_y += tl.sum(tl.where(is_y, mix, 0.0), 1)
                    zt_y += tl.sum(tl.where(is_y[:, None, :], zt, 0.0), 2)
        lse_q = m_q + tl.log(l_q)

        tsum = tl.sum(alpha, 1)
        if ENSEMBLE == "logit":
            loss = kd_weight * (lse_x - qx / l_q)
        else:
            loss = kd_weight * (lse_x * tsum - tl.sum(tl.where(mask, alpha * px_m / l_tm, 0.0), 1))
        if HAS_HARD:
            loss += hard_weight * (lse_s - zs_y)
        if TRAINABLE:
            if HAS_GATE_TERM:
                loss += gate_loss_weight * (m_g + tl.log(l_g) - mix_y)
            # Σ_c r_c z_Ti,c − Σ_c r_c m_c with r = softmax(m) − onehot(y)
            rz = ez / l_g[:, None] - zt_y
            rm = em / l_g - mix_y
            gs = gate_loss_weight * alpha * (rz - rm[:, None])
            gs = tl.where(mask, gs, 0.0)
            if WRITE_GRAD_SCORES:
                tl.store(gs_ptr + bm_off, gs, mask=mask)
            gsr = gs * grad_scale
            if REDUCE_GATE:
                _accumulate(pb_ptr + pid * M + ms, tl.sum(gsr, 0), mmask, t)
                if GATE == "hidden":
                    _hidden_gate_partials(h_ptr, pw_ptr, pid, t, gsr, rows, ms, mask, M, D, BLOCK_D)
        loss += 0.0 * guard
        tl.store(loss_ptr + rows, loss, mask=rmask)
        tl.store(alpha_ptr + bm_off, alpha, mask=mask)

        # ---- pass 3: the student gradient (and the class logit gate's partial dW) ----
        kd_scale = kd_weight * inv_t
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            smask = rmask[:, None] & cmask[None, :]
            tmask = mask[:, :, None] & cmask[None, None, :]
            zs = tl.load(zs_ptr + rows[:, None] * C + cols[None, :], mask=smask, other=0.0).to(tl.float32)
            zt = tl.load(zt_ptr + bm_off[:, :, None] * C + cols[None, None, :], mask=tmask, other=0.0).to(tl.float32)
            # The scaled logits go through the same tl.where as in passes 1-2 before the log-sum-exp
            # is subtracted. Besides masking, the select keeps the compiler from contracting
            # `z * inv_t - lse` into one FMA: that keeps the product's rounding residual, up to
            # ~0.01 at |z|/T ~ 2e5, where the maximum's log-probability must be exactly 0 (as it is
            # in passes 1-2). On an H200 that residual made C = 3, T = 0.05, |z| = 1e4 gradients
            # 0.04 off; this is the fix for it, not yet re-run on a GPU.
            if ENSEMBLE == "logit":
                xq = tl.where(smask, tl.sum(alpha[:, :, None] * zt, 1) * inv_t, neg_inf)
                q = tl.exp(xq - lse_q[:, None])
            else:
                xt = tl.where(tmask, zt * inv_t, neg_inf)
                q = tl.sum(tl.where(tmask, alpha[:, :, None] * tl.exp(xt - lse_tm[:, :, None]), 0.0), 1)
            x = tl.where(smask, zs * inv_t, neg_inf)
            g = kd_scale * (tl.exp(x - lse_x[:, None]) - q)
            if HAS_HARD:
                onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
                g += hard_weight * (tl.exp(zs - lse_s[:, None]) - onehot)
            tl.store(grad_ptr + rows[:, None] * C + cols[None, :], g * grad_scale, mask=smask)
            if GATE == "logit":
                if REDUCE_GATE:
                    _accumulate(pw_ptr + (pid * M + ms[:, None]) * C + cols[None, :], tl.sum(gsr[:, :, None] * zt, 0),
                                mmask[:, None] & cmask[None, :], t)
        tl.debug_barrier()  # this tile's partial updates land before the next tile reads them


def _launch(student, teacher, labels, teacher_hidden, gate, gate_weight, gate_bias, fixed_weights,
            temperature, hard_weight, kd_weight, ensemble, gate_loss_weight, grad_scale, reduce_gate, wrap):
    """Allocate, pick tiles, launch (``wrap`` None: allocate only, for fake tensors).

    Returns (loss, grad, grad_scores | empty, dW | empty, db | empty, α).
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    zs = student.contiguous()
    zt = teacher.contiguous()
    dev = zs.device
    B, M = zt.shape[0], zt.shape[1]
    binary = zs.dim() == 1
    C = 1 if binary else zs.shape[1]
    trainable = gate in ("logit", "hidden")
    has_hard = labels is not None and hard_weight != 0.0
    dummy = zs
    y = labels.contiguous() if labels is not None else dummy
    h = teacher_hidden.contiguous() if gate == "hidden" else dummy
    w = gate_weight.contiguous() if trainable else dummy
    b = gate_bias.contiguous() if trainable else dummy
    fixed = fixed_weights.contiguous() if gate == "fixed" else dummy
    D = h.shape[2] if gate == "hidden" else 1

    block_m = _common.next_pow2(M)
    block_d = min(_common.next_pow2(D), MAX_BLOCK_D)
    block_c = min(_common.next_pow2(C), MAX_BLOCK_C)
    per_row = block_m * (block_d if gate == "hidden" else 1) * (1 if binary else block_c)
    wide = gate == "hidden" or not binary  # 3-D tiles [rows, teachers, features or classes]
    block_b = _common.rows_per_program(per_row, tile_elems=_common.WIDE_TILE_ELEMS if wide else None)
    num_warps = 8 if wide else 4
    tiles = triton.cdiv(B, block_b)
    reduce_gate = trainable and reduce_gate
    # With gate partials, a bounded number of programs each walk several row tiles, so the
    # partials buffer is [a few programs per SM, ...] whatever B is; otherwise one tile each.
    tiles_per_program = triton.cdiv(tiles, _common.num_programs(tiles, zs.device)) if reduce_gate else 1
    P = triton.cdiv(tiles, tiles_per_program)

    f32 = torch.float32
    loss = torch.empty(B, device=dev, dtype=f32)
    grad = torch.empty(zs.shape, device=dev, dtype=f32)
    alpha = torch.empty(B, M, device=dev, dtype=f32)
    write_gs = trainable and not reduce_gate
    gs = torch.empty(B, M, device=dev, dtype=f32) if write_gs else loss.new_empty(0)
    if reduce_gate:
        k = D if gate == "hidden" else C
        pw = torch.empty((P, M) if gate == "logit" and binary else (P, M, k), device=dev, dtype=f32)
        pb = torch.empty(P, M, device=dev, dtype=f32)
    else:
        pw, pb = loss.new_empty(0), loss.new_empty(0)
    common = dict(GATE=gate, TRAINABLE=trainable, ENSEMBLE=ensemble, HAS_HARD=has_hard, HAS_GATE_TERM=gate_loss_weight != 0.0,
                  WRITE_GRAD_SCORES=write_gs, REDUCE_GATE=reduce_gate, BLOCK_B=block_b, BLOCK_M=block_m,
                  BLOCK_D=block_d, num_warps=num_warps)
    if wrap is None:
        g_w = torch.empty(gate_weight.shape, device=dev, dtype=f32) if reduce_gate else loss.new_empty(0)
        g_b = torch.empty(M, device=dev, dtype=f32) if reduce_gate else loss.new_empty(0)
        return loss, grad, gs, g_w, g_b, alpha
    inv_t = 1.0 / temperature
    if binary:
        wrap(_gated_distill_loss_binary_fwd_kernel)[(P,)](
            zs, zt, y, h, w, b, fixed, loss, grad, gs, alpha, pw, pb,
            B, M, D, inv_t, hard_weight, kd_weight, gate_loss_weight, grad_scale, tiles_per_program, **common,
        )
    else:
        wrap(_gated_distill_loss_classes_fwd_kernel)[(P,)](
            zs, zt, y, h, w, b, fixed, loss, grad, gs, alpha, pw, pb,
            B, M, C, D, inv_t, hard_weight, kd_weight, gate_loss_weight, grad_scale, tiles_per_program,
            BLOCK_C=block_c, **common,
        )
    if reduce_gate:
        g_w, g_b = _common.sum_partials(pw, pb, wrap)
    else:
        g_w, g_b = loss.new_empty(0), loss.new_empty(0)  # distinct: op outputs may not alias
    return loss, grad, gs, g_w, g_b, alpha


# (loss, grad, grad_scores, dW, db, α); absent outputs are empty tensors (an op schema cannot
# express optional outputs)
_OUTPUTS = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_OP = _common.register_op("fastkd::gated_distill_loss_fwd", _launch,
                          op_signature(GatedDistillLossArgs, grad_scale=float, reduce_gate=bool, _returns=_OUTPUTS))


def gated_distill_loss_forward(
    a: GatedDistillLossArgs,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Loss [B], d loss / d z_S, d loss / d s [B, M] (trainable gates, else None), α [B, M]; fp32.

    Same contract as :func:`fastkd.reference.gated_distill_loss_fwd_ref`. Used for
    ``reduction="none"``, where the gate gradients depend on the per-sample ``grad_output``.
    """
    loss, grad, gs, _, _, alpha = _common.run_op(_OP, _launch, *a.values(), 1.0, False)
    return loss, grad, (gs if a.gate in ("logit", "hidden") else None), alpha


def gated_distill_loss_forward_reduced(
    a: GatedDistillLossArgs, grad_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Loss [B], ``grad_scale``·d loss / d z_S, ``grad_scale``·d loss / d (w, b) (summed over the
    batch; None for gates without parameters), α [B, M]; fp32.

    Same contract as :func:`fastkd.reference.gated_distill_loss_fwd_reduced_ref`. Used for
    ``reduction`` "mean" (``grad_scale`` = 1/B) and "sum" (1): the gate gradients never exist
    per sample, only as one partial per program.
    """
    loss, grad, _, g_w, g_b, alpha = _common.run_op(_OP, _launch, *a.values(), float(grad_scale), True)
    if a.gate not in ("logit", "hidden"):
        return loss, grad, None, None, alpha
    return loss, grad, g_w, g_b, alpha

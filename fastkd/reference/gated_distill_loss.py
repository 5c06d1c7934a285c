"""Plain-torch teacher-gated multi-teacher KD loss: the oracle (:func:`gated_distill_loss_ref`,
:func:`gate_weights_ref`) and the CPU path (:func:`gated_distill_loss_fwd_ref` and its
batch-reduced twin, twins of ``fastkd.kernels.gated_distill_loss``)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..loss_args import GatedDistillLossArgs
from . import _cross_entropy as ce

__all__ = [
    "gate_weights_ref",
    "gated_distill_loss_ref",
    "gated_distill_loss_fwd_ref",
    "gate_alpha_fwd_ref",
    "gated_distill_loss_fwd_reduced_ref",
    "gate_param_grads_ref",
    "TRAINABLE_GATES",
]

TRAINABLE_GATES = ("logit", "hidden")


def gate_weights_ref(
    teacher_logits: torch.Tensor,
    gate: Union[str, torch.Tensor],
    gate_weight: Optional[torch.Tensor] = None,
    gate_bias: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample teacher weights α [B, M] (differentiable w.r.t. the gate parameters only)."""
    B, M = teacher_logits.shape[:2]
    dt = ce.compute_dtype(teacher_logits)
    if isinstance(gate, torch.Tensor):
        return gate.to(device=teacher_logits.device, dtype=dt).expand(B, M)
    if gate == "mean":
        return torch.full((B, M), 1.0 / M, device=teacher_logits.device, dtype=dt)
    if gate == "logit":
        z = teacher_logits.detach().to(dt)
        if z.dim() == 2:
            scores = z * gate_weight + gate_bias
        else:
            scores = (z * gate_weight).sum(-1) + gate_bias
    elif gate == "hidden":
        h = teacher_hidden.detach().to(dt)
        scores = (h * gate_weight).sum(-1) + gate_bias
    else:
        raise ValueError(f"unknown gate {gate!r}")
    return torch.softmax(scores, dim=1)


def _mix(alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Σ_i α_i x_i over the teacher axis, for x [B, M] or [B, M, C]
    return (alpha * x).sum(1) if x.dim() == 2 else (alpha.unsqueeze(-1) * x).sum(1)


def _target(alpha: torch.Tensor, zt: torch.Tensor, inv_t: float, ensemble: str) -> torch.Tensor:
    # σ(Σ α_i z_Ti / T) or Σ α_i σ(z_Ti / T); softmax over the classes for [B, M, C]
    act = torch.sigmoid if zt.dim() == 2 else (lambda v: torch.softmax(v, dim=-1))
    return act(_mix(alpha, zt) * inv_t) if ensemble == "logit" else _mix(alpha, act(zt * inv_t))


def _nan_guard(zt: torch.Tensor) -> torch.Tensor:
    # 0·Σ z_T: a non-finite teacher logit must make the loss non-finite
    return 0.0 * (zt.sum(1) if zt.dim() == 2 else zt.sum((1, 2)))


def gated_distill_loss_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    *,
    gate: Union[str, torch.Tensor] = "mean",
    gate_weight: Optional[torch.Tensor] = None,
    gate_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    hard_weight: float = 1.0,
    kd_weight: float = 1.0,
    ensemble: str = "logit",
    gate_loss_weight: float = 1.0,
    reduction: str = "mean",
    t2_scale: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Oracle of :func:`fastkd.functional.gated_distill_loss`; returns ``(loss, alpha)``.

    Binary: student [B], teachers [B, M]. C classes: student [B, C], teachers [B, M, C].
    """
    dt = ce.compute_dtype(student_logits)
    binary = student_logits.dim() == 1
    zs = student_logits.to(dt)
    zt = teacher_logits.detach().to(dt)
    T = float(temperature)
    alpha = gate_weights_ref(zt, gate, gate_weight, gate_bias, teacher_hidden)
    target = _target(alpha.detach(), zt, 1.0 / T, ensemble)  # the KD term trains the student only
    loss = ce.kd_hard_oracle(zs, target, labels, T, hard_weight, kd_weight, t2_scale, binary)
    trainable = isinstance(gate, str) and gate in TRAINABLE_GATES
    if trainable and gate_loss_weight != 0.0:
        loss = loss + gate_loss_weight * ce.hard_oracle(labels, _mix(alpha, zt), binary)
    return ce.reduce(loss + _nan_guard(zt), reduction), alpha


def gate_alpha_fwd_ref(
    teacher: torch.Tensor,
    gate: str,
    gate_weight: Optional[torch.Tensor],
    gate_bias: Optional[torch.Tensor],
    fixed_weights: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
) -> torch.Tensor:
    """α [B, M] in the compute dtype of ``teacher``: the first step of the CPU path, also what
    :func:`fastkd.functional.gate_weights` computes (α alone is too small for a kernel)."""
    dt = ce.compute_dtype(teacher)
    zt = teacher.to(dt)
    B, M = zt.shape[:2]
    if gate == "logit":
        w = gate_weight.to(dt)
        scores = (zt * w + gate_bias.to(dt)) if zt.dim() == 2 else ((zt * w).sum(-1) + gate_bias.to(dt))
        return torch.softmax(scores, dim=1)
    if gate == "hidden":
        scores = torch.einsum("bmd,md->bm", teacher_hidden.to(dt), gate_weight.to(dt))
        return torch.softmax(scores + gate_bias.to(dt), dim=1)
    if gate == "mean":
        return torch.full((B, M), 1.0 / M, device=zt.device, dtype=dt)
    return fixed_weights.to(device=zt.device, dtype=dt).expand(B, M)  # "fixed"


def gated_distill_loss_fwd_ref(
    a: GatedDistillLossArgs,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Loss [B], d loss / d z_S ([B] or [B, C]), d loss / d s ([B, M] or None), α [B, M].

    The gradient w.r.t. the gate parameters follows from d loss / d s by the chain rule
    (``s_i = w_i·x_i + b_i`` with x the teacher logit or hidden vector); the caller reduces it.

    With m = Σ α_i z_Ti, r = σ(m) − y (binary) or softmax(m) − onehot(y) (classes)::

        d gate_term / d s_j = α_j · (r·z_Tj − r·m)
    """
    dt = ce.compute_dtype(a.student)
    binary = a.student.dim() == 1
    zs, zt = a.student.to(dt), a.teacher.to(dt)
    inv_t = 1.0 / float(a.temperature)
    alpha = gate_alpha_fwd_ref(zt, a.gate, a.gate_weight, a.gate_bias, a.fixed_weights, a.teacher_hidden)

    p = _target(alpha, zt, inv_t, a.ensemble)
    loss, grad = ce.kd_hard_with_grad(zs, p, a.labels, inv_t, a.hard_weight, a.kd_weight, binary)

    grad_scores = None
    if a.gate in TRAINABLE_GATES:
        m = _mix(alpha, zt)  # [B] or [B, C]
        g_term, r = ce.label_ce_with_grad(m, a.labels, binary)
        if a.gate_loss_weight != 0.0:
            loss = loss + a.gate_loss_weight * g_term
        if binary:
            grad_scores = a.gate_loss_weight * alpha * (r.unsqueeze(1) * (zt - m.unsqueeze(1)))
        else:
            rz = (zt * r.unsqueeze(1)).sum(-1)  # [B, M]
            rm = (m * r).sum(-1, keepdim=True)  # [B, 1]
            grad_scores = a.gate_loss_weight * alpha * (rz - rm)
    return loss + _nan_guard(zt), grad, grad_scores, alpha


def gate_param_grads_ref(grad_scores: torch.Tensor, feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chain rule through ``s_bi = w_i·x_bi + b_i``: ``dW_i = Σ_b g_bi x_bi``, ``db_i = Σ_b g_bi``.

    ``grad_scores`` g [B, M]; ``feats`` x: teacher logits [B, M] (binary logit gate), [B, M, C]
    (class logit gate) or hidden vectors [B, M, d] (hidden gate).
    """
    x = feats.to(grad_scores.dtype)
    if x.dim() == 2:
        g_w = (grad_scores * x).sum(0)
    else:
        g_w = torch.einsum("bm,bmk->mk", grad_scores, x)
    return g_w, grad_scores.sum(0)


def gated_distill_loss_fwd_reduced_ref(
    a: GatedDistillLossArgs, grad_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """:func:`gated_distill_loss_fwd_ref` with the gate gradients summed over the batch.

    Returns loss [B], ``grad_scale``·d loss / d z_S, ``grad_scale``·Σ_b d loss_b / d w and
    ``grad_scale``·Σ_b d loss_b / d b (None for gates without parameters), α [B, M]. This is the
    twin of the fused Triton launcher used for ``reduction`` "mean" (``grad_scale`` = 1/B) and
    "sum" (1), which never materialises the per-sample gate gradients.
    """
    loss, grad, grad_scores, alpha = gated_distill_loss_fwd_ref(a)
    grad = grad * grad_scale
    if grad_scores is None:
        return loss, grad, None, None, alpha
    feats = a.teacher_hidden if a.gate == "hidden" else a.teacher
    g_w, g_b = gate_param_grads_ref(grad_scores * grad_scale, feats)
    return loss, grad, g_w, g_b, alpha

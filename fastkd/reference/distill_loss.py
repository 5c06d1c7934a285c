"""Plain-torch single-teacher KD loss: the oracle (:func:`distill_loss_ref`) and the CPU path
(:func:`distill_loss_fwd_ref`, twin of ``fastkd.kernels.distill_loss``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..loss_args import DistillLossArgs
from . import _cross_entropy as ce

__all__ = ["distill_loss_ref", "distill_loss_fwd_ref"]


def distill_loss_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    hard_weight: float = 1.0,
    kd_weight: float = 1.0,
    reduction: str = "mean",
    t2_scale: bool = False,
) -> torch.Tensor:
    """Oracle of :func:`fastkd.functional.distill_loss` (binary: [B] logits; C classes: [B, C])."""
    dt = ce.compute_dtype(student_logits)
    binary = student_logits.dim() == 1
    zs = student_logits.to(dt)
    zt = teacher_logits.detach().to(dt)
    T = float(temperature)
    target = torch.sigmoid(zt / T) if binary else torch.softmax(zt / T, dim=-1)
    loss = ce.kd_hard_oracle(zs, target, labels, T, hard_weight, kd_weight, t2_scale, binary)
    nan_guard = 0.0 * (zt if binary else zt.sum(-1))
    return ce.reduce(loss + nan_guard, reduction)


def distill_loss_fwd_ref(a: DistillLossArgs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss [B] and d loss_b / d z_S,b ([B] or [B, C]), both in the compute dtype.

    The closed form of :func:`fastkd.reference._cross_entropy.kd_hard_with_grad` against the
    teacher's tempered distribution σ(z_T/T) (softmax for C classes).
    """
    dt = ce.compute_dtype(a.student)
    binary = a.student.dim() == 1
    zs, zt = a.student.to(dt), a.teacher.to(dt)
    inv_t = 1.0 / float(a.temperature)
    p = torch.sigmoid(zt * inv_t) if binary else torch.softmax(zt * inv_t, dim=-1)
    loss, grad = ce.kd_hard_with_grad(zs, p, a.labels, inv_t, a.hard_weight, a.kd_weight, binary)
    return loss + 0.0 * (zt if binary else zt.sum(-1)), grad

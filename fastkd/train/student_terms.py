"""One batch's student loss in a :class:`~fastkd.train.distiller.Distiller`: the distillation and
hard-label terms (:class:`~fastkd.losses.GatedDistillLoss`), the KD term alone on augmented rows,
the hint term, and which modules and parameters the student's optimiser trains.

A mixin: the Distiller holds the state these methods read (``student``, ``loss``, ``hints``,
``hint_weight``, ``joint_gate``).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .. import functional as FK
from ..gates import ensemble_logits
from .loop import _plus_regularization

__all__ = ["StudentTerms"]


class StudentTerms:
    """The student's loss terms and trainable parts (mixed into :class:`Distiller`)."""

    student: nn.Module
    loss: nn.Module
    hints: Optional[nn.ModuleList]
    hint_weight: float
    joint_gate: bool

    def _student_out(self, ids):
        if self.hints is not None:
            return self.student(ids, return_hidden=True)
        return self.student(ids), None

    def _hint_term(self, h_s, t_hidden) -> torch.Tensor:
        return sum(h(h_s, t_hidden[:, i]) for i, h in enumerate(self.hints)) / len(self.hints)

    def _student_loss(self, ids, y, t_logits, t_hidden, real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One batch's loss. ``t_logits``: [B, M] (joint gate) or [B, 1] (precomputed target).
        ``real``: bool [B], False on augmented rows, whose hard-label and gate terms are off."""
        z_s, h_s = self._student_out(ids)
        if real is None or bool(real.all()):
            loss = self.loss(z_s, t_logits, y, t_hidden)
        else:
            loss = self._mixed_loss(z_s, t_logits, y, t_hidden, real)
        if self.hints is not None:
            loss = loss + self.hint_weight * self._hint_term(h_s, t_hidden)
        return _plus_regularization(self.student, loss)

    def _mixed_loss(self, z_s, t_logits, y, t_hidden, real) -> torch.Tensor:
        """Mean over the batch of: full loss on real rows, KD term alone on augmented rows."""
        crit = self.loss
        n = z_s.shape[0]
        fake = ~real
        total = z_s.new_zeros(())
        if bool(real.any()):
            h = None if t_hidden is None else t_hidden[real]
            total = total + crit(z_s[real], t_logits[real], y[real], h) * real.sum()
        if self.joint_gate:
            # the gate term needs labels: augmented rows use the gate's α as a constant
            h = None if t_hidden is None else t_hidden[fake]
            alpha = FK.gate_weights(t_logits[fake], crit.gate_arg, crit.weight.detach(), crit.bias.detach(), h)
            target = ensemble_logits(t_logits[fake], alpha, crit.ensemble, crit.temperature)
        else:
            target = t_logits[fake, 0]
        kd = FK.distill_loss(z_s[fake], target, None, crit.temperature, 0.0, crit.kd_weight, reduction="sum")
        return (total + kd) / n

    @torch.no_grad()
    def _kd_term(self, z_s: torch.Tensor, t_logits: torch.Tensor, t_hidden) -> torch.Tensor:
        """Summed distillation term ``CE(target, z_S/T)`` alone: what ``early_stop="kd"`` monitors."""
        crit = self.loss
        alpha = FK.gate_weights(t_logits, crit.gate_arg, crit.weight, crit.bias, t_hidden)
        target = ensemble_logits(t_logits, alpha, crit.ensemble, crit.temperature)
        return FK.distill_loss(z_s, target, None, crit.temperature, 0.0, 1.0, reduction="sum")

    def _student_params(self) -> List[nn.Parameter]:
        params = list(self.student.parameters()) + list(self.loss.parameters())
        if self.hints is not None:
            params += list(self.hints.parameters())
        return params

    def _student_modules(self) -> Dict[str, nn.Module]:
        mods = {"student": self.student, "loss": self.loss}
        if self.hints is not None:
            mods["hints"] = self.hints
        return mods

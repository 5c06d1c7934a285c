"""Plain-torch hint loss, per sample: the only implementation (a linear map and a norm need no
kernel), which :func:`fastkd.functional.hint_loss` validates for and reduces. Tests check it
against independent formulas (``tests/test_hint_loss.py``), not against itself."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _cross_entropy as ce

__all__ = ["hint_loss_fwd_ref"]


def hint_loss_fwd_ref(student_hint: torch.Tensor, teacher_hint: torch.Tensor, weight: torch.Tensor,
                      normalize: bool) -> torch.Tensor:
    """``‖W v_T − v_S‖²`` per sample [B], summed over features; W is ``weight`` [d_S, d_T].

    ``normalize=True``: both sides L2-normalised first (``2 − 2 cos``; a zero vector stays zero).
    """
    dt = ce.compute_dtype(student_hint)
    target = F.linear(teacher_hint.detach().to(dt), weight.to(dt))
    vs = student_hint.to(dt)
    if normalize:
        target, vs = F.normalize(target, dim=-1), F.normalize(vs, dim=-1)
    return (target - vs).pow(2).sum(-1)

"""What the trainer adapters share: teacher logits by row, probabilities → logits, and a loss
module joined to a student (module tree, optimizer) so the trainer saves and trains its gate."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import nn

from ..functional import PROB_EPS

#: the attribute under which an adapter registers the loss module in the student's module tree
LOSS_ATTR = "fastkd_loss"


def teacher_rows(teacher_logits, name: str = "teacher_logits"):
    """``teacher_logits`` as something indexed by row: a float tensor [N, M], or a
    :class:`~fastkd.TeacherCache`'s (possibly memory-mapped) logits. A numpy array is wrapped
    without a copy."""
    from ..train.teacher_cache import TeacherCache

    if isinstance(teacher_logits, TeacherCache):
        return teacher_logits.logits
    if isinstance(teacher_logits, np.ndarray):
        teacher_logits = torch.from_numpy(teacher_logits)
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(f"{name} must be a TeacherCache, a torch.Tensor or a numpy array [N, M], "
                        f"got {type(teacher_logits).__name__}")
    if teacher_logits.dim() != 2 or not teacher_logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point [N, M] (rows x teachers), got "
                         f"{teacher_logits.dtype} {list(teacher_logits.shape)}")
    return teacher_logits.detach()


def num_rows(rows) -> int:
    return int(rows.shape[0])


def probs_to_logits(p: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Sigmoid probabilities → float32 logits, clamped to [PROB_EPS, 1 − PROB_EPS] first
    (the conversion of the losses' ``teacher_outputs="prob"``; computed in float64)."""
    p = torch.as_tensor(np.asarray(p) if not isinstance(p, torch.Tensor) else p).double()
    return torch.logit(p, eps=PROB_EPS).float()


def check_outputs_kind(criterion: nn.Module, outputs_probabilities: bool, where: str) -> None:
    """The loss must read the student's outputs as they are: probabilities after a sigmoid."""
    kind = getattr(criterion, "student_outputs", None)
    if kind is None:
        raise TypeError(f"criterion must be a fastkd loss module (GatedDistillLoss, DistillLoss), "
                        f"got {type(criterion).__name__}")
    want = "prob" if outputs_probabilities else "logit"
    if kind != want:
        what = "probabilities (it ends in a sigmoid)" if outputs_probabilities else "logits (no sigmoid)"
        raise ValueError(f"{where} outputs {what}: build the loss with student_outputs={want!r}, "
                         f"got student_outputs={kind!r}")


def join_student(model: nn.Module, criterion: nn.Module, optimizer, device) -> None:
    """Register ``criterion`` as ``model.fastkd_loss`` (its gate is then in ``state_dict()``,
    so the trainer's checkpoints and best-weight restores carry it, and in ``parameters()``, so
    an optimizer built afterwards trains it) and add its parameters to ``optimizer`` when it
    was built before."""
    if hasattr(model, LOSS_ATTR):
        raise ValueError(f"the model already has a {LOSS_ATTR!r} attribute (attached twice?); "
                         f"call .remove() on the earlier attachment first")
    model.add_module(LOSS_ATTR, criterion.to(device))
    params = [p for p in criterion.parameters() if p.requires_grad]
    if optimizer is not None and params:
        have = {id(q) for g in optimizer.param_groups for q in g["params"]}
        missing = [p for p in params if id(p) not in have]
        if missing:
            optimizer.add_param_group({"params": missing})


def leave_student(model: nn.Module, optimizer) -> None:
    criterion = model._modules.pop(LOSS_ATTR, None)
    if criterion is None or optimizer is None:
        return
    ids = {id(p) for p in criterion.parameters()}
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if not any(id(p) in ids for p in g["params"])]

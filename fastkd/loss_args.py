"""The arguments of the two loss ops, written once: one frozen dataclass per op.

The plain-torch twins in :mod:`fastkd.reference` and the Triton launchers in ``fastkd.kernels``
take one of these, so the dispatch seam (:mod:`fastkd._autograd`) hands the same object to
either side. The ``torch.library`` schemas of the kernels are derived from the fields
(:func:`op_signature`), since an op schema must list every argument flat.

Inputs are validated and normalised before they get here (:mod:`fastkd.functional`): binary
logits are [B], class logits [B, C]; teachers [B] / [B, C] (one teacher) or [B, M] / [B, M, C];
labels float32 [B] or int64 [B]. ``kd_weight`` already includes any T² factor.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Optional

import torch

__all__ = ["DistillLossArgs", "GatedDistillLossArgs", "op_signature"]


@dataclasses.dataclass(frozen=True)
class DistillLossArgs:
    """One teacher: ``hard_weight·CE(y, z_S) + kd_weight·CE(σ(z_T/T), z_S/T)`` per sample."""

    student: torch.Tensor
    teacher: torch.Tensor
    labels: Optional[torch.Tensor]
    temperature: float
    hard_weight: float
    kd_weight: float

    def values(self) -> tuple:
        """The fields in order (not ``dataclasses.astuple``: that deep-copies the tensors)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class GatedDistillLossArgs:
    """M teachers mixed by a gate; ``gate`` is "logit", "hidden", "mean" or "fixed"
    (α = ``fixed_weights`` [M]); the parameters are set for the trainable gates only."""

    student: torch.Tensor
    teacher: torch.Tensor
    labels: Optional[torch.Tensor]
    teacher_hidden: Optional[torch.Tensor]
    gate: str
    gate_weight: Optional[torch.Tensor]
    gate_bias: Optional[torch.Tensor]
    fixed_weights: Optional[torch.Tensor]
    temperature: float
    hard_weight: float
    kd_weight: float
    ensemble: str
    gate_loss_weight: float

    values = DistillLossArgs.values


def op_signature(args_type: type, _returns: object, **extra: type) -> inspect.Signature:
    """The flat signature of an op taking the fields of ``args_type`` then ``extra`` (name: type)
    and returning ``_returns``, with resolved annotations, as ``torch.library`` infers a schema
    from."""
    hints = typing.get_type_hints(args_type)
    names = [f.name for f in dataclasses.fields(args_type)] + list(extra)
    hints.update(extra)
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[n]) for n in names]
    return inspect.Signature(params, return_annotation=_returns)

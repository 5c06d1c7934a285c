"""``nn.Module`` forms of the distillation losses: configuration and parameters, then ``forward``.

The maths lives in :mod:`fastkd.functional`; see there for the exact formulas.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import _validate as V
from . import functional as FK

__all__ = ["DistillLoss", "GatedDistillLoss", "HintLoss"]


class DistillLoss(nn.Module):
    r"""``hard_weight·CE(y, z_S) + kd_weight·CE(σ(z_T/T), z_S/T)`` — single-teacher soft-label KD.

    Args:
        temperature: T > 0.
        hard_weight: weight γ of the hard-label term.
        kd_weight: weight β of the KD term.
        reduction: "mean" | "sum" | "none".
        t2_scale: multiply the KD term by T² (Hinton's scaling; off in the paper's form).
        student_outputs, teacher_outputs: "logit" (default) | "prob": sigmoid probabilities,
            clamped to [1e-7, 1 − 1e-7] and converted exactly with ``torch.logit``
            (:func:`fastkd.functional.distill_loss`). With "logit", a warning when every value of
            a batch of ≥ 64 rows lies in [0, 1], spread over ≥ 0.2 (checked on every call on CPU,
            on calls 1, 10, 100 and 1000 elsewhere: one host sync each).

    Shape:
        - student_logits, teacher_logits: [B] / [B, 1] (binary) or [B, C]
        - labels: [B] or ``None`` (KD term only)
        - output: scalar, or [B] with ``reduction="none"``

    Example::

        >>> import torch
        >>> from fastkd import DistillLoss
        >>> crit = DistillLoss(temperature=2.0, hard_weight=1.0, kd_weight=0.5)
        >>> zs = torch.randn(32, requires_grad=True)
        >>> crit(zs, torch.randn(32), torch.randint(0, 2, (32,)).float()).backward()
    """

    def __init__(
        self,
        temperature: float = 1.0,
        hard_weight: float = 1.0,
        kd_weight: float = 1.0,
        reduction: str = "mean",
        *,
        t2_scale: bool = False, student_outputs: str = "logit", teacher_outputs: str = "logit",
    ) -> None:  # the functional twin's settings, as torch's modules mirror torch.nn.functional
        super().__init__()
        self.temperature = V.check_temperature(temperature)
        self.hard_weight = V.check_weight("hard_weight", hard_weight)
        self.kd_weight = V.check_weight("kd_weight", kd_weight)
        V.check_reduction(reduction)
        self.reduction = reduction
        self.t2_scale = bool(t2_scale)
        self.student_outputs, self.teacher_outputs = _outputs(student_outputs, teacher_outputs)
        self._calls = 0  # for the probability spot checks off the CPU

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _spot_check(self, student_logits, teacher_logits)
        return FK.distill_loss(
            student_logits, teacher_logits, labels, self.temperature, self.hard_weight,
            self.kd_weight, self.reduction, self.t2_scale,
            student_outputs=self.student_outputs, teacher_outputs=self.teacher_outputs,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hard_weight={self.hard_weight}, kd_weight={self.kd_weight}, "
            f"reduction={self.reduction!r}, t2_scale={self.t2_scale}" + _outputs_repr(self)
        )


class GatedDistillLoss(nn.Module):
    r"""Distillation from M teachers mixed per sample by a learnable teacher gate.

    ``α = softmax_i(w_i·z_Ti + b_i)`` (``gate="logit"``, the paper's gate), ``softmax_i(w_i·h_Ti + b_i)``
    (``gate="hidden"``), uniform (``gate="mean"``), or fixed (``gate=<tensor [M]>``). The gate
    parameters start at zero, i.e. at plain averaging. Per sample::

        hard_weight·CE(y, z_S) + kd_weight·CE(target, z_S/T) + gate_loss_weight·CE(y, Σ α_i z_Ti)

    with ``target = σ(Σ α_i z_Ti / T)`` (``ensemble="logit"``) or ``Σ α_i σ(z_Ti / T)``
    (``ensemble="prob"``). The KD term trains the student (α held constant), the gate term trains
    the gate only, and the teachers receive no gradient — put the module's parameters in the
    optimizer together with the student's. After each call ``last_alpha`` holds the batch's α
    (detached), for inspection.

    Args:
        num_teachers: M.
        temperature: T > 0.
        hard_weight: weight γ of the student's hard-label term.
        kd_weight: weight β of the KD term.
        gate: "logit" | "hidden" | "mean" | tensor [M] of fixed weights (non-negative, sum 1).
        hidden_dim: d, the teachers' hidden width (required by ``gate="hidden"``).
        ensemble: "logit" | "prob".
        gate_loss_weight: weight of the gate's own label loss.
        reduction: "mean" | "sum" | "none".
        num_classes: 1 for binary CTR logits (default), C ≥ 2 for softmax logits.
        t2_scale: multiply the KD term by T².
        student_outputs, teacher_outputs: "logit" (default) | "prob": sigmoid probabilities
            (binary only; e.g. a FuxiCTR or DeepCTR-Torch model's output), clamped to
            [1e-7, 1 − 1e-7] and converted exactly with ``torch.logit`` before the op. With
            "logit", a warning when every value of a batch of ≥ 64 rows lies in [0, 1], spread
            over ≥ 0.2 (checked on every call on CPU, on calls 1, 10, 100 and 1000 elsewhere).

    Shape:
        - student_logits: [B] / [B, 1] (binary) or [B, C]
        - teacher_logits: [B, M] (binary) or [B, M, C]
        - labels: [B]
        - teacher_hidden: [B, M, d] (``gate="hidden"`` only)
        - output: scalar, or [B] with ``reduction="none"``

    Example::

        >>> import torch
        >>> from fastkd import GatedDistillLoss
        >>> crit = GatedDistillLoss(num_teachers=3, temperature=2.0)
        >>> zs = torch.randn(64, requires_grad=True)
        >>> loss = crit(zs, torch.randn(64, 3), torch.randint(0, 2, (64,)).float())
        >>> loss.backward()
        >>> crit.last_alpha.shape
        torch.Size([64, 3])
    """

    def __init__(
        self,
        num_teachers: int,
        temperature: float = 1.0,
        hard_weight: float = 1.0,
        kd_weight: float = 1.0,
        gate: Union[str, torch.Tensor] = "logit",
        hidden_dim: Optional[int] = None,
        ensemble: str = "logit",
        gate_loss_weight: float = 1.0,
        reduction: str = "mean",
        *,
        num_classes: int = 1,
        t2_scale: bool = False,
        student_outputs: str = "logit",
        teacher_outputs: str = "logit",
    ) -> None:
        super().__init__()
        if isinstance(num_teachers, bool) or not isinstance(num_teachers, int) or num_teachers < 1:
            raise ValueError(f"num_teachers must be a positive int, got {num_teachers!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be 1 (binary) or a class count >= 2, got {num_classes!r}")
        self.num_teachers = num_teachers
        self.num_classes = num_classes
        self.temperature = V.check_temperature(temperature)
        self.hard_weight = V.check_weight("hard_weight", hard_weight)
        self.kd_weight = V.check_weight("kd_weight", kd_weight)
        self.gate_loss_weight = V.check_weight("gate_loss_weight", gate_loss_weight)
        V.check_reduction(reduction)
        self.reduction = reduction
        if ensemble not in FK.ENSEMBLES:
            raise ValueError(f"ensemble must be one of {FK.ENSEMBLES}, got {ensemble!r}")
        self.ensemble = ensemble
        self.t2_scale = bool(t2_scale)
        self.hidden_dim = hidden_dim
        self.student_outputs, self.teacher_outputs = _outputs(student_outputs, teacher_outputs)
        self._calls = 0  # for the probability spot checks off the CPU

        self.weight: Optional[nn.Parameter] = None
        self.bias: Optional[nn.Parameter] = None
        if isinstance(gate, torch.Tensor):
            self.gate = "fixed"
            self.register_buffer("fixed_weights", FK.check_fixed_weights(gate, num_teachers).clone().float())
        elif gate == "logit":
            self.gate = gate
            w_shape = (num_teachers,) if num_classes == 1 else (num_teachers, num_classes)
            self.weight = nn.Parameter(torch.zeros(w_shape))
            self.bias = nn.Parameter(torch.zeros(num_teachers))
        elif gate == "hidden":
            if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
                raise ValueError(f"gate='hidden' needs hidden_dim, a positive int; got {hidden_dim!r}")
            self.gate = gate
            self.weight = nn.Parameter(torch.zeros(num_teachers, hidden_dim))
            self.bias = nn.Parameter(torch.zeros(num_teachers))
        elif gate == "mean":
            self.gate = gate
        else:
            raise ValueError(f"gate must be one of {FK.GATES} or a tensor of fixed weights, got {gate!r}")
        self.last_alpha: Optional[torch.Tensor] = None

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        teacher_hidden: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # types first: the shape checks below read .dim() and .shape
        V.check_logits("student_logits", student_logits)
        V.check_logits("teacher_logits", teacher_logits)
        for name, t in (("labels", labels), ("teacher_hidden", teacher_hidden)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if student_logits.dim() == 0:
            raise ValueError("student_logits must be [B] or [B, C], got a 0-dim tensor")
        M = teacher_logits.shape[1] if teacher_logits.dim() >= 2 else None
        if M != self.num_teachers:
            raise ValueError(
                f"teacher_logits must be [B, M, ...] with M = num_teachers = {self.num_teachers}, "
                f"got {list(teacher_logits.shape)}"
            )
        C = 1 if student_logits.dim() == 1 or student_logits.shape[-1] == 1 else student_logits.shape[-1]
        if C != self.num_classes:
            raise ValueError(
                f"student_logits {list(student_logits.shape)} imply {C} classes but the loss was built "
                f"with num_classes={self.num_classes}"
            )
        if self.gate == "hidden" and teacher_hidden is not None and teacher_hidden.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"teacher_hidden's last dimension must be hidden_dim = {self.hidden_dim}, got {list(teacher_hidden.shape)}"
            )
        _spot_check(self, student_logits, teacher_logits)
        loss, alpha = FK.gated_distill_loss(
            student_logits, teacher_logits, labels, teacher_hidden,
            gate=self.gate_arg, gate_weight=self.weight, gate_bias=self.bias,
            temperature=self.temperature, hard_weight=self.hard_weight, kd_weight=self.kd_weight,
            ensemble=self.ensemble, gate_loss_weight=self.gate_loss_weight,
            reduction=self.reduction, t2_scale=self.t2_scale, return_weights=True,
            student_outputs=self.student_outputs, teacher_outputs=self.teacher_outputs,
        )
        self.last_alpha = alpha
        return loss

    @property
    def gate_arg(self) -> Union[str, torch.Tensor]:
        """The ``gate`` argument of :func:`fastkd.functional.gated_distill_loss` for this module."""
        return self.fixed_weights if self.gate == "fixed" else self.gate

    def extra_repr(self) -> str:
        return (
            f"num_teachers={self.num_teachers}, gate={self.gate!r}, ensemble={self.ensemble!r}, "
            f"temperature={self.temperature}, hard_weight={self.hard_weight}, kd_weight={self.kd_weight}, "
            f"gate_loss_weight={self.gate_loss_weight}, reduction={self.reduction!r}" + _outputs_repr(self)
        )


def _outputs(student_outputs: str, teacher_outputs: str):
    FK._check_outputs("student_outputs", student_outputs)
    FK._check_outputs("teacher_outputs", teacher_outputs)
    return student_outputs, teacher_outputs


# The calls of a module on which its inputs are checked for probabilities where the functional
# skips the check (tensors off the CPU): one host sync each. Not the first call alone: an
# untrained model's outputs are near-constant and the check passes them by.
SPOT_CHECK_CALLS = (1, 10, 100, 1000)


def _spot_check(module: nn.Module, student_logits, teacher_logits) -> None:
    calls = getattr(module, "_calls", 0) + 1  # (a module pickled before this attribute existed)
    if torch.compiler.is_compiling() or calls > SPOT_CHECK_CALLS[-1]:
        return
    module._calls = calls
    if calls in SPOT_CHECK_CALLS and isinstance(student_logits, torch.Tensor) and \
            isinstance(teacher_logits, torch.Tensor) and not V.values_checkable(student_logits):
        FK._check_output_kinds(student_logits, teacher_logits, module.student_outputs, module.teacher_outputs,
                               force=True)


def _outputs_repr(module: nn.Module) -> str:
    kinds = (("student_outputs", module.student_outputs), ("teacher_outputs", module.teacher_outputs))
    return "".join(f", {k}={v!r}" for k, v in kinds if v != "logit")


class HintLoss(nn.Module):
    r"""Hint regression ``‖W v_T − v_S‖²`` (summed over features, reduced over the batch).

    ``W`` (``self.proj``, a bias-free ``nn.Linear(teacher_dim, student_dim)``) maps the teacher's
    hint into the student's space and is trained with the student; ``v_T`` gets no gradient.

    Args:
        teacher_dim: d_T, width of the teacher's hint vector.
        student_dim: d_S, width of the student's guided vector.
        reduction: "mean" | "sum" | "none".
        normalize: compare L2-normalised ``W v_T`` and ``v_S`` (``2 − 2 cos``). Use it when W
            trains with the student: the plain formula then has the trivial minimum W = 0,
            v_S = 0 (see :func:`fastkd.functional.hint_loss`).

    Shape:
        - student_hint: [B, d_S]
        - teacher_hint: [B, d_T]
        - output: scalar, or [B] with ``reduction="none"``

    Example::

        >>> import torch
        >>> from fastkd import HintLoss
        >>> hint = HintLoss(teacher_dim=64, student_dim=16)
        >>> vs = torch.randn(8, 16, requires_grad=True)
        >>> hint(vs, torch.randn(8, 64)).backward()
    """

    def __init__(self, teacher_dim: int, student_dim: int, reduction: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        for name, v in (("teacher_dim", teacher_dim), ("student_dim", student_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        V.check_reduction(reduction)
        self.reduction = reduction
        self.normalize = bool(normalize)
        self.proj = nn.Linear(teacher_dim, student_dim, bias=False)

    def forward(self, student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
        return FK.hint_loss(student_hint, teacher_hint, self.proj.weight, self.reduction, self.normalize)

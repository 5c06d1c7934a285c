"""Functional form of fastkd's distillation losses.

The signatures follow ``torch.nn.functional.binary_cross_entropy_with_logits``
(https://pytorch.org/docs/stable/generated/torch.nn.functional.binary_cross_entropy_with_logits.html):
logits first, targets next, ``reduction`` in {"mean", "sum", "none"} with torch's meaning
("mean" averages over the batch, "none" returns one value per sample, shape [B]).

Notation: ``CE(t, z) = -t·log σ(z) - (1-t)·log σ(-z)`` for binary logits (computed from the logit,
stable for any |z|), the softmax cross-entropy against a target distribution for C ≥ 2 classes;
T is the temperature. Inputs in float16/bfloat16 are computed in float32 and the loss is returned
in float32. No gradient ever reaches the teacher tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _validate as V
from ._autograd import DistillLossFunction, GatedDistillLossFunction
# re-exported: the public constants, and the checks fastkd.losses and the adapters share
from ._outputs import (OUTPUTS, PROB_CHECK_MIN_BATCH, PROB_CHECK_MIN_SPAN, PROB_EPS, _check_output_kinds,  # noqa: F401
                       _check_outputs, _to_logits, _warn_if_probabilities)
from .loss_args import DistillLossArgs, GatedDistillLossArgs
from .reference import TRAINABLE_GATES
from .reference._cross_entropy import reduce
from .reference.hint_loss import hint_loss_fwd_ref
from .reference.gated_distill_loss import gate_alpha_fwd_ref

__all__ = ["distill_loss", "gated_distill_loss", "gate_weights", "hint_loss"]

ENSEMBLES = ("logit", "prob")
GATES = ("logit", "hidden", "mean")
def _class_axis(student: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Return the student logits as [B] (binary) or [B, C] and the class count (1 = binary)."""
    if student.dim() == 1:
        return student, 1
    if student.dim() == 2:
        if student.shape[1] == 1:
            return student.reshape(-1), 1
        return student, student.shape[1]
    raise ValueError(
        f"student_logits must be [B] or [B, 1] (binary) or [B, C] (C classes), got {list(student.shape)}"
    )


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    hard_weight: float = 1.0,
    kd_weight: float = 1.0,
    reduction: str = "mean",
    t2_scale: bool = False,
    *,
    student_outputs: str = "logit",
    teacher_outputs: str = "logit",
) -> torch.Tensor:
    r"""Soft-label knowledge-distillation loss from one teacher, with an optional hard-label term.

    ``hard_weight·CE(y, z_S) + kd_weight·CE(σ(z_T/T), z_S/T)`` per sample (softmax analogue for
    C ≥ 2). As in Zhu et al. (CIKM 2020) there is no T² factor; ``t2_scale=True`` multiplies the KD
    term by T² as in Hinton et al. The gradient w.r.t. ``z_S`` of the KD term is
    ``kd_weight·(σ(z_S/T) − σ(z_T/T))/T``.

    Args:
        student_logits: student logits, floating point.
        teacher_logits: teacher logits, same shape; never receives a gradient.
        labels: hard labels, or ``None`` for the KD term alone. Binary: values in [0, 1] (soft
            labels allowed; any real or bool dtype). C classes: int64 class indices.
        temperature: T > 0.
        hard_weight: weight γ of the hard-label term (≥ 0).
        kd_weight: weight β of the KD term (≥ 0).
        reduction: "mean" | "sum" | "none".
        t2_scale: multiply the KD term by T².
        student_outputs, teacher_outputs: "logit" (default) | "prob": the tensor holds sigmoid
            probabilities (binary only), e.g. from a trainer whose model ends in a sigmoid. They
            are clamped to [1e-7, 1 − 1e-7] (``PROB_EPS``) and converted exactly with
            ``torch.logit`` (float16/bfloat16 in float32); the student's gradient flows back
            through the conversion (zero where clamped). Values outside [0, 1] raise a
            ``ValueError`` (CPU tensors). With "logit", a batch of ≥ 64 rows whose values all lie
            in [0, 1], spread over ≥ 0.2, gives a ``UserWarning`` naming the argument (CPU
            tensors; the modules also spot-check calls 1, 10, 100 and 1000 on other devices).

    Shape:
        - student_logits, teacher_logits: [B] or [B, 1] (binary), or [B, C]
        - labels: [B] (or [B, 1] for binary)
        - output: scalar, or [B] with ``reduction="none"``

    Example::

        >>> import torch
        >>> from fastkd.functional import distill_loss
        >>> zs = torch.randn(8, requires_grad=True)
        >>> zt, y = torch.randn(8), torch.randint(0, 2, (8,)).float()
        >>> loss = distill_loss(zs, zt, y, temperature=2.0, kd_weight=0.5)
        >>> loss.backward()
    """
    V.check_logits("student_logits", student_logits)
    V.check_logits("teacher_logits", teacher_logits)
    _check_outputs("student_outputs", student_outputs)
    _check_outputs("teacher_outputs", teacher_outputs)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {list(student_logits.shape)}, "
            f"got {list(teacher_logits.shape)}"
        )
    V.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    T = V.check_temperature(temperature)
    hw = V.check_weight("hard_weight", hard_weight)
    kw = V.check_weight("kd_weight", kd_weight)
    V.check_reduction(reduction)
    student, num_classes = _class_axis(student_logits)
    teacher = teacher_logits.reshape(student.shape).detach()
    V.check_nonempty("student_logits", student.shape[0])
    _check_output_kinds(student, teacher, student_outputs, teacher_outputs)
    if student_outputs == "prob":
        student = _to_logits("student_logits", "student_outputs", student, num_classes)
    if teacher_outputs == "prob":
        teacher = _to_logits("teacher_logits", "teacher_outputs", teacher, num_classes)
    if labels is not None:
        labels = V.prepare_labels(labels, student.shape[0], num_classes)
    if t2_scale:
        kw *= T * T
    args = DistillLossArgs(student, teacher, labels, float(T), float(hw), float(kw))
    return DistillLossFunction.apply(student, args, reduction)


def gated_distill_loss(
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
    return_weights: bool = False,
    student_outputs: str = "logit",
    teacher_outputs: str = "logit",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""Distillation from an ensemble of M teachers mixed by a per-sample gate.

    Teacher weights ``α = softmax_i(s_i)`` per sample, with gate scores

    - ``gate="logit"``: ``s_i = w_i·z_Ti + b_i`` (the paper's teacher gate; w_i a scalar for binary
      logits, a C-vector otherwise),
    - ``gate="hidden"``: ``s_i = w_i·h_Ti + b_i`` on the teachers' last hidden vectors,
    - ``gate="mean"``: ``s_i = 0`` (plain averaging, no parameters),
    - ``gate=<tensor [M]>``: fixed weights α (non-negative, summing to 1).

    The ensemble target is ``σ(Σ α_i z_Ti / T)`` (``ensemble="logit"``) or ``Σ α_i σ(z_Ti / T)``
    (``ensemble="prob"``), softmax analogues for C ≥ 2. Per sample::

        hard_weight·CE(y, z_S) + kd_weight·CE(target, z_S/T) + gate_loss_weight·CE(y, Σ α_i z_Ti)

    The last term exists only for trainable gates and is what trains them. Gradients are
    one-way: the KD term treats α as a constant and trains the student; the gate term trains the
    gate parameters only; the teachers get no gradient.

    Args:
        student_logits: student logits.
        teacher_logits: the M teachers' logits.
        labels: hard labels (required when ``hard_weight > 0`` or the gate is trainable); binary
            values in [0, 1], or int64 class indices.
        teacher_hidden: teachers' hidden vectors, required for ``gate="hidden"``.
        gate: "logit" | "hidden" | "mean" | a tensor of fixed weights.
        gate_weight: w, required by the trainable gates.
        gate_bias: b, required by the trainable gates.
        temperature: T > 0.
        hard_weight, kd_weight, gate_loss_weight: non-negative term weights.
        ensemble: "logit" (mix logits) | "prob" (mix probabilities).
        reduction: "mean" | "sum" | "none".
        t2_scale: multiply the KD term by T².
        return_weights: also return α (detached).
        student_outputs, teacher_outputs: "logit" (default) | "prob" (sigmoid probabilities,
            binary only), as in :func:`distill_loss`: clamped to [1e-7, 1 − 1e-7] and converted
            exactly with ``torch.logit`` before the op (the gate then sees the teachers' logits).

    Shape:
        - student_logits: [B] / [B, 1] (binary) or [B, C]
        - teacher_logits: [B, M] (binary) or [B, M, C]
        - teacher_hidden: [B, M, d]
        - gate_weight: [M] (binary logit gate), [M, C] (class logit gate), [M, d] (hidden gate)
        - gate_bias: [M]
        - output: scalar, or [B] with ``reduction="none"``; α: [B, M]

    Example::

        >>> import torch
        >>> from fastkd.functional import gated_distill_loss
        >>> zs = torch.randn(16, requires_grad=True)
        >>> zt, y = torch.randn(16, 3), torch.randint(0, 2, (16,)).float()
        >>> w = torch.zeros(3, requires_grad=True); b = torch.zeros(3, requires_grad=True)
        >>> loss, alpha = gated_distill_loss(zs, zt, y, gate="logit", gate_weight=w, gate_bias=b,
        ...                                  temperature=2.0, return_weights=True)
        >>> loss.backward()
        >>> alpha.shape
        torch.Size([16, 3])
    """
    V.check_logits("student_logits", student_logits)
    V.check_logits("teacher_logits", teacher_logits)
    _check_outputs("student_outputs", student_outputs)
    _check_outputs("teacher_outputs", teacher_outputs)
    student, num_classes = _class_axis(student_logits)
    B = student.shape[0]
    teacher = teacher_logits
    if num_classes == 1 and teacher.dim() == 3 and teacher.shape[2] == 1:
        teacher = teacher.reshape(teacher.shape[:2])
    want = "[B, M]" if num_classes == 1 else f"[B, M, {num_classes}]"
    if teacher.dim() != (2 if num_classes == 1 else 3) or teacher.shape[0] != B or (
        num_classes > 1 and teacher.shape[2] != num_classes
    ):
        raise ValueError(
            f"teacher_logits must be {want} for student_logits {list(student_logits.shape)}, "
            f"got {list(teacher_logits.shape)}"
        )
    M = teacher.shape[1]
    if M == 0:
        raise ValueError("teacher_logits has no teachers (M = 0)")
    V.check_nonempty("student_logits", B)
    V.check_same_device(
        student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
        teacher_hidden=teacher_hidden, gate_weight=gate_weight, gate_bias=gate_bias,
    )
    T = V.check_temperature(temperature)
    hw = V.check_weight("hard_weight", hard_weight)
    kw = V.check_weight("kd_weight", kd_weight)
    gw = V.check_weight("gate_loss_weight", gate_loss_weight)
    V.check_reduction(reduction)
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")

    gate_kind, fixed, hidden, gate_weight, gate_bias = _check_gate(gate, gate_weight, gate_bias, teacher_hidden,
                                                                    B, M, num_classes, student.device)
    if gate_kind in TRAINABLE_GATES and labels is None:
        raise ValueError(f"labels are required with the trainable gate {gate_kind!r}: its loss term trains it")
    if labels is None and hw != 0.0:
        raise ValueError("labels are required when hard_weight > 0 (pass hard_weight=0 for the KD term alone)")
    if labels is not None:
        labels = V.prepare_labels(labels, B, num_classes)
    if t2_scale:
        kw *= T * T
    _check_output_kinds(student, teacher, student_outputs, teacher_outputs)
    if student_outputs == "prob":
        student = _to_logits("student_logits", "student_outputs", student, num_classes)
    if teacher_outputs == "prob":
        teacher = _to_logits("teacher_logits", "teacher_outputs", teacher, num_classes)

    args = GatedDistillLossArgs(student, teacher.detach(), labels, hidden, gate_kind, gate_weight, gate_bias, fixed,
                                float(T), float(hw), float(kw), ensemble, float(gw))
    loss, alpha = GatedDistillLossFunction.apply(student, gate_weight, gate_bias, args, reduction)
    return (loss, alpha) if return_weights else loss


def _check_gate(gate, gate_weight, gate_bias, teacher_hidden, B: int, M: int, num_classes: int, device):
    """Validate a gate and its tensors; returns (kind, fixed α | None, hidden | None, w | None, b | None)."""
    fixed = None
    if isinstance(gate, torch.Tensor):
        fixed = check_fixed_weights(gate, M).to(device)
        gate_kind = "fixed"
    elif gate in GATES:
        gate_kind = gate
    else:
        raise ValueError(f"gate must be one of {GATES} or a tensor of fixed weights, got {gate!r}")
    hidden = None
    if gate_kind not in TRAINABLE_GATES:
        return gate_kind, fixed, hidden, None, None
    if gate_kind == "hidden":
        if teacher_hidden is None:
            raise ValueError("gate='hidden' needs teacher_hidden [B, M, d]")
        V.check_logits("teacher_hidden", teacher_hidden)
        if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != (B, M):
            raise ValueError(f"teacher_hidden must be [B, M, d] = [{B}, {M}, d], got {list(teacher_hidden.shape)}")
        hidden = teacher_hidden.detach()
        w_shape = (M, teacher_hidden.shape[2])
    else:
        w_shape = (M,) if num_classes == 1 else (M, num_classes)
    for name, p, shape in (("gate_weight", gate_weight, w_shape), ("gate_bias", gate_bias, (M,))):
        if p is None:
            raise ValueError(f"gate={gate_kind!r} needs {name} of shape {list(shape)}")
        V.check_logits(name, p)
        if tuple(p.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(p.shape)}")
    return gate_kind, fixed, hidden, gate_weight, gate_bias


def gate_weights(
    teacher_logits: torch.Tensor,
    gate: Union[str, torch.Tensor] = "mean",
    gate_weight: Optional[torch.Tensor] = None,
    gate_bias: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The per-sample teacher weights α of a gate, as :func:`gated_distill_loss` mixes them.

    Args:
        teacher_logits: the M teachers' logits.
        gate, gate_weight, gate_bias, teacher_hidden: as in :func:`gated_distill_loss`.

    Shape:
        - teacher_logits: [B, M] (binary) or [B, M, C]
        - output: α [B, M], float32 (float64 for float64 logits); differentiable w.r.t. the gate
          parameters, never the teachers.

    Example::

        >>> import torch
        >>> from fastkd.functional import gate_weights
        >>> zt = torch.randn(4, 3)
        >>> gate_weights(zt, "logit", torch.ones(3), torch.zeros(3)).shape
        torch.Size([4, 3])
    """
    V.check_logits("teacher_logits", teacher_logits)
    if teacher_logits.dim() not in (2, 3) or teacher_logits.shape[1] == 0:
        raise ValueError(f"teacher_logits must be [B, M] or [B, M, C] with M >= 1, got {list(teacher_logits.shape)}")
    B, M = teacher_logits.shape[:2]
    num_classes = 1 if teacher_logits.dim() == 2 else teacher_logits.shape[2]
    kind, fixed, hidden, w, b = _check_gate(gate, gate_weight, gate_bias, teacher_hidden, B, M, num_classes,
                                            teacher_logits.device)
    return gate_alpha_fwd_ref(teacher_logits.detach(), kind, w, b, fixed, hidden)


def check_fixed_weights(weights: torch.Tensor, num_teachers: int) -> torch.Tensor:
    """Validate fixed teacher weights: float [M], finite, non-negative, summing to 1."""
    V.check_logits("gate (fixed weights)", weights)
    if tuple(weights.shape) != (num_teachers,):
        raise ValueError(f"fixed gate weights must have shape [M] = [{num_teachers}], got {list(weights.shape)}")
    if V.values_checkable(weights):
        w = weights.detach().double()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"fixed gate weights must be finite and >= 0, got {weights.tolist()}")
        if abs(float(w.sum()) - 1.0) > 1e-4:
            raise ValueError(f"fixed gate weights must sum to 1, got sum {float(w.sum()):.6g}")
    return weights.detach()


def hint_loss(
    student_hint: torch.Tensor,
    teacher_hint: torch.Tensor,
    weight: torch.Tensor,
    reduction: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    r"""Hint regression ``‖W v_T − v_S‖²``: squared error summed over features, then reduced.

    W maps the teacher's hint into the student's space (as in the paper); ``v_T`` gets no gradient.

    When W is trained together with the student (as in :class:`~fastkd.Distiller`), the plain
    formula has a trivial minimum, ``W = 0`` and ``v_S = 0``: on Frappe the student's last layer
    died and its AUC fell to 0.50. ``normalize=True`` compares directions instead,
    ``‖W v_T/‖W v_T‖ − v_S/‖v_S‖‖² = 2 − 2 cos(W v_T, v_S)``, which is scale-free, so shrinking
    either side no longer lowers the loss (a zero vector counts as direction 0).

    Args:
        student_hint: v_S, the student's hidden vector.
        teacher_hint: v_T, the teacher's hidden vector.
        weight: W.
        reduction: "mean" (over the batch) | "sum" | "none".
        normalize: compare L2-normalised vectors (see above).

    Shape:
        - student_hint: [B, d_S]
        - teacher_hint: [B, d_T]
        - weight: [d_S, d_T]
        - output: scalar, or [B] with ``reduction="none"``

    Example::

        >>> import torch
        >>> from fastkd.functional import hint_loss
        >>> vs = torch.randn(4, 8, requires_grad=True)
        >>> W = torch.randn(8, 32, requires_grad=True)
        >>> hint_loss(vs, torch.randn(4, 32), W).backward()
    """
    V.check_logits("student_hint", student_hint)
    V.check_logits("teacher_hint", teacher_hint)
    V.check_logits("weight", weight)
    V.check_reduction(reduction)
    if student_hint.dim() != 2 or teacher_hint.dim() != 2:
        raise ValueError(
            f"student_hint and teacher_hint must be [B, d], got {list(student_hint.shape)} and {list(teacher_hint.shape)}"
        )
    if teacher_hint.shape[0] != student_hint.shape[0]:
        raise ValueError(f"batch sizes differ: student_hint {student_hint.shape[0]}, teacher_hint {teacher_hint.shape[0]}")
    if tuple(weight.shape) != (student_hint.shape[1], teacher_hint.shape[1]):
        raise ValueError(
            f"weight must be [d_S, d_T] = [{student_hint.shape[1]}, {teacher_hint.shape[1]}], got {list(weight.shape)}"
        )
    V.check_nonempty("student_hint", student_hint.shape[0])
    V.check_same_device(student_hint=student_hint, teacher_hint=teacher_hint, weight=weight)
    return reduce(hint_loss_fwd_ref(student_hint, teacher_hint, weight, normalize), reduction)

"""``autograd.Function``s of the distillation losses, and the one dispatch seam.

Both losses are terminal: the forward computes the per-sample gradients together with the loss
(in closed form), so ``backward`` only scales saved gradients by ``grad_output``. That halves the
work of a training step and keeps no activations alive. Double backward is not supported
(a clear error under ``create_graph=True``); the differentiable oracles in
:mod:`fastkd.reference` serve higher-order needs.

The per-sample work is done by one implementation chosen at one seam, :func:`_fwd_impl`: the fused
Triton kernels of ``fastkd.kernels`` for CUDA tensors, the closed-form twins in
:mod:`fastkd.reference` otherwise (``FASTKD_BACKEND=torch|triton`` forces one). With
``reduction`` "mean"/"sum" the gated loss folds the batch reduction of the gate-parameter
gradients into its forward (per-program partials, then a fixed-order sum: bit-reproducible).

Inputs reaching these Functions are already validated and normalised by
:mod:`fastkd.functional` and packed in the op's argument dataclass (:mod:`fastkd.loss_args`),
which both sides of the seam take.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch

from . import reference
from .loss_args import DistillLossArgs, GatedDistillLossArgs

# op -> (plain-PyTorch twin, module and name of the Triton launcher). Both sides of a row take
# the same arguments and return the same outputs, so the seam below only picks one.
_IMPLS = {
    "distill_loss": (reference.distill_loss_fwd_ref, "fastkd.kernels.distill_loss", "distill_loss_forward"),
    "gated_distill_loss": (
        reference.gated_distill_loss_fwd_ref, "fastkd.kernels.gated_distill_loss", "gated_distill_loss_forward",
    ),
    "gated_distill_loss_reduced": (
        reference.gated_distill_loss_fwd_reduced_ref, "fastkd.kernels.gated_distill_loss",
        "gated_distill_loss_forward_reduced",
    ),
}
BACKENDS = ("torch", "triton")
# find_spec locates the package without importing it: importing fastkd stays cheap and CUDA-free.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_launcher(op: str) -> Callable:
    # Plain import statements, not importlib: torch.compile traces through them (it refuses
    # importlib), and importing only here keeps Triton out of `import fastkd`.
    from .kernels import distill_loss as distill_kernels
    from .kernels import gated_distill_loss as gated_kernels

    _, module, name = _IMPLS[op]
    return getattr(distill_kernels if module.endswith(".distill_loss") else gated_kernels, name)


def forced_backend() -> str:
    """``FASTKD_BACKEND`` as ``""`` (unset or "auto"), ``"torch"`` or ``"triton"``; anything else
    raises. Read at each dispatch so tests and users can switch it at run time; every op
    (losses, embedding) reads it through here."""
    forced = os.environ.get("FASTKD_BACKEND", "").strip().lower()
    if forced not in ("", "auto") + BACKENDS:
        raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS} (or unset), got {forced!r}")
    return "" if forced == "auto" else forced


def _fwd_impl(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Callable:
    """The single place where an implementation is chosen for an op on a device.

    CUDA tensors run the fused Triton launcher (``fastkd.kernels``) when Triton is installed,
    everything else the plain-PyTorch twin in :mod:`fastkd.reference`. float64 stays on the
    reference (the kernels compute in float32), so gradcheck works on any device. The
    environment variable ``FASTKD_BACKEND=torch|triton`` forces one side; Triton on CPU tensors
    needs the interpreter (``TRITON_INTERPRET=1``, set before Triton is first imported).
    """
    forced = forced_backend()
    if forced == "torch":
        return _IMPLS[op][0]
    if forced == "triton":
        if not _HAS_TRITON:
            raise RuntimeError("FASTKD_BACKEND=triton but Triton is not installed (pip install 'fastkd[triton]')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"FASTKD_BACKEND=triton needs CUDA tensors (got {device.type}); Triton runs CPU tensors only "
                "in its interpreter (TRITON_INTERPRET=1)"
            )
        if dtype == torch.float64:
            raise TypeError("the Triton kernels compute in float32; use FASTKD_BACKEND=torch for float64 inputs")
        return _triton_launcher(op)
    if device.type == "cuda" and _HAS_TRITON and dtype != torch.float64:
        return _triton_launcher(op)
    return _IMPLS[op][0]


def _refuse_double_backward() -> None:
    # Grad mode is on inside backward only under create_graph=True. The saved closed-form
    # gradients are constants, so a second derivative through them would be silently wrong.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastkd's distillation losses are differentiable once (their gradients are computed in "
            "closed form during the forward pass); for double backward use the oracles in "
            "fastkd.reference (distill_loss_ref, gated_distill_loss_ref)"
        )


def _scale_per_sample(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    # reduction="none": grad_output is [B]; broadcast over the class axis when there is one
    go = grad_output.to(grad.dtype)
    return grad * (go if grad.dim() == 1 else go.unsqueeze(-1))


class DistillLossFunction(torch.autograd.Function):
    """Temperature-scaled KD + hard-label loss with gradients written in the forward pass.

    ``student`` is ``args.student`` passed again: autograd tracks tensors among the direct
    arguments only.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, args: DistillLossArgs, reduction: str) -> torch.Tensor:
        loss, grad = _fwd_impl("distill_loss", student.device, student.dtype)(args)
        if reduction == "mean":
            loss = loss.mean()
            grad = grad / student.shape[0]
        elif reduction == "sum":
            loss = loss.sum()
        ctx.reduction = reduction
        ctx.student_dtype = student.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        _refuse_double_backward()
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            g = _scale_per_sample(grad, grad_output)
        else:
            g = grad * grad_output.to(grad.dtype)
        return g.to(ctx.student_dtype), None, None


class GatedDistillLossFunction(torch.autograd.Function):
    """Teacher-gated multi-teacher KD loss; returns ``(loss, alpha)`` with α non-differentiable.

    Gradients reach the student logits and the gate parameters only, never the teachers.
    ``student``, ``gate_weight`` and ``gate_bias`` are the fields of ``args`` passed again:
    autograd tracks tensors among the direct arguments only.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, gate_weight: Optional[torch.Tensor], gate_bias: Optional[torch.Tensor],
                args: GatedDistillLossArgs, reduction: str):
        gate = args.gate
        ctx.reduction = reduction
        ctx.gate = gate
        ctx.student_dtype = student.dtype
        ctx.param_dtype = gate_weight.dtype if gate_weight is not None else None
        if reduction == "none":
            # grad_output is per sample: keep d loss / d s and reduce to parameters in backward
            fwd = _fwd_impl("gated_distill_loss", student.device, student.dtype)
            loss, grad, grad_scores, alpha = fwd(args)
            if grad_scores is not None:
                feats = args.teacher_hidden if gate == "hidden" else args.teacher
                ctx.save_for_backward(grad, grad_scores, feats)
            else:
                ctx.save_for_backward(grad)
        else:
            # the batch reduction is folded into the forward: the gate gradients arrive summed
            # (deterministically, on the Triton path), backward scales two small tensors
            scale = 1.0 / student.shape[0] if reduction == "mean" else 1.0
            fwd = _fwd_impl("gated_distill_loss_reduced", student.device, student.dtype)
            loss, grad, g_w, g_b, alpha = fwd(args, scale)
            loss = loss.mean() if reduction == "mean" else loss.sum()
            if g_w is not None:
                ctx.save_for_backward(grad, g_w, g_b)
            else:
                ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(alpha)
        return loss, alpha

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_alpha):
        _refuse_double_backward()
        saved = ctx.saved_tensors
        grad = saved[0]
        g_w = g_b = None
        if ctx.reduction == "none":
            g = _scale_per_sample(grad, grad_output)
            if len(saved) == 3:
                grad_scores = saved[1] * grad_output.to(saved[1].dtype).unsqueeze(1)
                # chain rule through s_bi = w_i·x_bi + b_i
                g_w, g_b = reference.gate_param_grads_ref(grad_scores, saved[2])
        else:
            go = grad_output.to(grad.dtype)
            g = grad * go
            if len(saved) == 3:
                g_w, g_b = saved[1] * go, saved[2] * go
        if g_w is not None:
            g_w, g_b = g_w.to(ctx.param_dtype), g_b.to(ctx.param_dtype)
        return g.to(ctx.student_dtype), g_w, g_b, None, None


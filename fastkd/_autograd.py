"""``autograd.Function``s of the distillation losses, and the one dispatch seam.

Both losses are terminal: the forward computes the per-sample gradients together with the loss
(in closed form), so ``backward`` only scales saved gradients by ``grad_output``. That halves the
work of a training step and keeps no activations alive. Double backward is not supported
(a clear error under ``create_graph=True``); the differentiable oracles in
:mod:`fastkd.reference` serve higher-order needs.

Inputs reaching these Functions are already validated and normalised by
:mod:`fastkd.functional`: binary logits are [B], class logits [B, C]; teachers [B] / [B, C]
(single teacher) or [B, M] / [B, M, C]; labels float32 [B] or int64 [B].
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference


def _fwd_impl(op: str, device: torch.device):
    """The single place where an implementation is chosen for an op on a device.

    Every device runs the plain-PyTorch closed-form path for now; the fused Triton launchers
    (``fastkd.kernels``) plug in here for CUDA tensors, with identical signatures.
    """
    return getattr(reference, f"{op}_fwd_ref")


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
    """Temperature-scaled KD + hard-label loss with gradients written in the forward pass."""

    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: Optional[torch.Tensor],
        temperature: float,
        hard_weight: float,
        kd_weight: float,
        reduction: str,
    ) -> torch.Tensor:
        fwd = _fwd_impl("distill_loss", student.device)
        loss, grad = fwd(student, teacher, labels, temperature, hard_weight, kd_weight)
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
        return g.to(ctx.student_dtype), None, None, None, None, None, None


class GatedDistillLossFunction(torch.autograd.Function):
    """Teacher-gated multi-teacher KD loss; returns ``(loss, alpha)`` with α non-differentiable.

    Gradients reach the student logits and the gate parameters only, never the teachers.
    """

    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: Optional[torch.Tensor],
        teacher_hidden: Optional[torch.Tensor],
        gate_weight: Optional[torch.Tensor],
        gate_bias: Optional[torch.Tensor],
        fixed_weights: Optional[torch.Tensor],
        gate: str,
        temperature: float,
        hard_weight: float,
        kd_weight: float,
        ensemble: str,
        gate_loss_weight: float,
        reduction: str,
    ):
        fwd = _fwd_impl("gated_distill_loss", student.device)
        loss, grad, grad_scores, alpha = fwd(
            student, teacher, labels, teacher_hidden, gate, gate_weight, gate_bias,
            fixed_weights, temperature, hard_weight, kd_weight, ensemble, gate_loss_weight,
        )
        B = student.shape[0]
        if reduction == "mean":
            loss = loss.mean()
            grad = grad / B
            if grad_scores is not None:
                grad_scores = grad_scores / B
        elif reduction == "sum":
            loss = loss.sum()

        ctx.reduction = reduction
        ctx.gate = gate
        ctx.student_dtype = student.dtype
        ctx.param_dtype = gate_weight.dtype if gate_weight is not None else None
        feats = None
        if grad_scores is not None:
            feats = teacher_hidden if gate == "hidden" else teacher
        if grad_scores is not None and reduction != "none":
            # Reduce to parameter gradients now; backward then scales two small tensors.
            gw, gb = _gate_param_grads(grad_scores, feats, gate)
            ctx.save_for_backward(grad, gw, gb)
        elif grad_scores is not None:
            ctx.save_for_backward(grad, grad_scores, feats)
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
                g_w, g_b = _gate_param_grads(grad_scores, saved[2], ctx.gate)
        else:
            go = grad_output.to(grad.dtype)
            g = grad * go
            if len(saved) == 3:
                g_w, g_b = saved[1] * go, saved[2] * go
        if g_w is not None:
            g_w, g_b = g_w.to(ctx.param_dtype), g_b.to(ctx.param_dtype)
        return (g.to(ctx.student_dtype), None, None, None, g_w, g_b) + (None,) * 8


def _gate_param_grads(grad_scores: torch.Tensor, feats: torch.Tensor, gate: str):
    """Chain rule through s_bi = w_i·x_bi + b_i: dW_i = Σ_b g_bi x_bi, db_i = Σ_b g_bi."""
    gs = grad_scores
    x = feats.to(gs.dtype)
    if x.dim() == 2:  # binary logit gate: x_bi is a scalar
        g_w = (gs * x).sum(0)
    else:  # class-logit gate ([B, M, C]) or hidden gate ([B, M, d])
        g_w = torch.einsum("bm,bmk->mk", gs, x)
    return g_w, gs.sum(0)

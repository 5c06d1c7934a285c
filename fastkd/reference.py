"""Plain-PyTorch implementations of every fastkd op.

Two kinds of function live here, and both are public so benchmarks and tests can import them:

* ``*_ref``: the **oracle**. Written with ordinary differentiable torch ops (``autograd`` derives
  the gradients, torch's own ``binary_cross_entropy_with_logits`` / ``log_softmax`` compute the
  cross-entropies), it states the semantics as plainly as possible. Tests compare everything else
  against it, including double-backward.
* ``*_fwd_ref``: the **CPU fast path**. It has exactly the interface of the Triton launchers in
  ``fastkd.kernels``: one call returns the per-sample loss *and* the per-sample gradients in
  closed form (the terminal-loss trick), so the ``autograd.Function`` in ``fastkd._autograd`` only
  has to scale them by ``grad_output``. It is derived independently of the oracle (hand-written
  gradients, numerically stable softplus / log-sum-exp) and tested against it.

Shapes: B samples, M teachers, C classes (C = 1 means binary: one logit per sample, shape [B]),
d hidden width. All maths is in float32 (float64 inputs stay float64 so gradcheck works).

Semantics (T = temperature, CE(t, z) = -t·log σ(z) - (1-t)·log σ(-z), softmax-CE for C ≥ 2)::

    distill:  hard_weight·CE(y, z_S) + kd_weight·s_T·CE(σ(z_T/T), z_S/T)        s_T = T² if t2_scale else 1
    gated:    α = softmax_i(s_i),  s_i = w_i·z_Ti + b_i | w_i·h_Ti + b_i | 0 | fixed α
              target = σ(Σ α_i z_Ti / T)  (ensemble="logit")  or  Σ α_i σ(z_Ti / T)  (ensemble="prob")
              hard_weight·CE(y, z_S) + kd_weight·s_T·CE(target, z_S/T) + gate_loss_weight·CE(y, Σ α_i z_Ti)
              α is a constant in the KD term; the gate term reaches the gate parameters only.
    hint:     ‖W v_T − v_S‖² summed over features (no gradient to v_T)

A non-finite teacher logit makes the loss non-finite (σ(±inf) is finite, so this is done on purpose
by adding ``0·Σ z_T``): a diverged teacher must never turn silently into a finite loss.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "distill_loss_ref",
    "gated_distill_loss_ref",
    "hint_loss_ref",
    "gate_weights_ref",
    "distill_loss_fwd_ref",
    "gated_distill_loss_fwd_ref",
    "gated_distill_loss_fwd_reduced_ref",
    "gate_param_grads_ref",
    "TRAINABLE_GATES",
]

TRAINABLE_GATES = ("logit", "hidden")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# --------------------------------------------------------------------------------------------
# Oracles (autograd)
# --------------------------------------------------------------------------------------------
def _ce_oracle(target: torch.Tensor, logits: torch.Tensor, binary: bool) -> torch.Tensor:
    """Per-sample cross-entropy of a target distribution against logits."""
    if binary:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


def _hard_oracle(labels: torch.Tensor, logits: torch.Tensor, binary: bool) -> torch.Tensor:
    if binary:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


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
    dt = _compute_dtype(student_logits)
    binary = student_logits.dim() == 1
    zs = student_logits.to(dt)
    zt = teacher_logits.detach().to(dt)
    T = float(temperature)
    target = torch.sigmoid(zt / T) if binary else torch.softmax(zt / T, dim=-1)
    kd = _ce_oracle(target, zs / T, binary)
    if t2_scale:
        kd = kd * (T * T)
    loss = kd_weight * kd
    if labels is not None and hard_weight != 0.0:
        loss = loss + hard_weight * _hard_oracle(labels, zs, binary)
    nan_guard = 0.0 * (zt if binary else zt.sum(-1))
    return _reduce(loss + nan_guard, reduction)


def gate_weights_ref(
    teacher_logits: torch.Tensor,
    gate: Union[str, torch.Tensor],
    gate_weight: Optional[torch.Tensor] = None,
    gate_bias: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample teacher weights α [B, M] (differentiable w.r.t. the gate parameters only)."""
    B, M = teacher_logits.shape[:2]
    dt = _compute_dtype(teacher_logits)
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
    dt = _compute_dtype(student_logits)
    binary = student_logits.dim() == 1
    zs = student_logits.to(dt)
    zt = teacher_logits.detach().to(dt)
    T = float(temperature)
    alpha = gate_weights_ref(zt, gate, gate_weight, gate_bias, teacher_hidden)
    a = alpha.detach()  # the KD term trains the student only
    if binary:
        if ensemble == "logit":
            target = torch.sigmoid((a * zt).sum(1) / T)
        else:
            target = (a * torch.sigmoid(zt / T)).sum(1)
    else:
        if ensemble == "logit":
            target = torch.softmax((a.unsqueeze(-1) * zt).sum(1) / T, dim=-1)
        else:
            target = (a.unsqueeze(-1) * torch.softmax(zt / T, dim=-1)).sum(1)
    kd = _ce_oracle(target, zs / T, binary)
    if t2_scale:
        kd = kd * (T * T)
    loss = kd_weight * kd
    if labels is not None and hard_weight != 0.0:
        loss = loss + hard_weight * _hard_oracle(labels, zs, binary)
    trainable = isinstance(gate, str) and gate in TRAINABLE_GATES
    if trainable and gate_loss_weight != 0.0:
        mixed = (alpha * zt).sum(1) if binary else (alpha.unsqueeze(-1) * zt).sum(1)
        loss = loss + gate_loss_weight * _hard_oracle(labels, mixed, binary)
    nan_guard = 0.0 * (zt.sum(1) if binary else zt.sum((1, 2)))
    return _reduce(loss + nan_guard, reduction), alpha


def hint_loss_ref(
    student_hint: torch.Tensor,
    teacher_hint: torch.Tensor,
    weight: torch.Tensor,
    reduction: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    """``‖W v_T − v_S‖²`` per sample, summed over features; W is ``weight`` [d_S, d_T].

    ``normalize=True``: both sides L2-normalised first (``2 − 2 cos``; a zero vector stays zero).
    """
    dt = _compute_dtype(student_hint)
    target = F.linear(teacher_hint.detach().to(dt), weight.to(dt))
    vs = student_hint.to(dt)
    if normalize:
        target, vs = F.normalize(target, dim=-1), F.normalize(vs, dim=-1)
    return _reduce((target - vs).pow(2).sum(-1), reduction)


# --------------------------------------------------------------------------------------------
# Fast path: loss and closed-form per-sample gradients in one call (twin of the Triton launchers)
# --------------------------------------------------------------------------------------------
def _softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + e^x) without overflow for any |x| and without torch.softplus's linear cut-off,
    # so the closed-form gradient σ(x) is exactly its derivative.
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def _binary_ce(target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # CE(t, z) = -t log σ(z) - (1-t) log σ(-z) = softplus(z) - t·z
    return _softplus(z) - target * z


def _softmax_ce(target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # -Σ_c t_c log softmax(z)_c = lse(z)·Σ t - Σ t·z
    return torch.logsumexp(z, dim=-1) * target.sum(-1) - (target * z).sum(-1)


def _label_ce_with_grad(z: torch.Tensor, labels: torch.Tensor, binary: bool):
    """Per-sample CE(y, z) against hard labels and its gradient: σ(z) − y or softmax(z) − onehot(y)."""
    if binary:
        y = labels.to(z.dtype)
        return _binary_ce(y, z), torch.sigmoid(z) - y
    logp = torch.log_softmax(z, dim=-1)
    grad = logp.exp()
    grad.scatter_add_(1, labels.view(-1, 1), torch.full_like(grad[:, :1], -1.0))
    return -logp.gather(1, labels.view(-1, 1)).squeeze(1), grad


def distill_loss_fwd_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    hard_weight: float,
    kd_weight: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss [B] and d loss_b / d z_S,b ([B] or [B, C]), both in the compute dtype.

    ``kd_weight`` already includes the T² factor when requested. Inputs are validated.

        binary:   d/dz_S = hard_weight·(σ(z_S) − y) + kd_weight·(σ(z_S/T) − σ(z_T/T)) / T
        classes:  d/dz_S = hard_weight·(softmax(z_S) − onehot(y)) + kd_weight·(softmax(z_S/T) − softmax(z_T/T)) / T
    """
    dt = _compute_dtype(student)
    binary = student.dim() == 1
    zs = student.to(dt)
    zt = teacher.to(dt)
    inv_t = 1.0 / float(temperature)
    xs = zs * inv_t
    if binary:
        p = torch.sigmoid(zt * inv_t)
        loss = kd_weight * _binary_ce(p, xs) + 0.0 * zt
        grad = (kd_weight * inv_t) * (torch.sigmoid(xs) - p)
    else:
        p = torch.softmax(zt * inv_t, dim=-1)
        loss = kd_weight * _softmax_ce(p, xs) + 0.0 * zt.sum(-1)
        grad = (kd_weight * inv_t) * (torch.softmax(xs, dim=-1) - p)
    if labels is not None and hard_weight != 0.0:
        hard, g_hard = _label_ce_with_grad(zs, labels, binary)
        loss = loss + hard_weight * hard
        grad = grad + hard_weight * g_hard
    return loss, grad


def gated_distill_loss_fwd_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    gate: str,
    gate_weight: Optional[torch.Tensor],
    gate_bias: Optional[torch.Tensor],
    fixed_weights: Optional[torch.Tensor],
    temperature: float,
    hard_weight: float,
    kd_weight: float,
    ensemble: str,
    gate_loss_weight: float,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Loss [B], d loss / d z_S ([B] or [B, C]), d loss / d s ([B, M] or None), α [B, M].

    ``gate`` is one of "logit", "hidden", "mean", "fixed" (α = ``fixed_weights`` [M]). The
    gradient w.r.t. the gate parameters follows from d loss / d s by the chain rule
    (``s_i = w_i·x_i + b_i`` with x the teacher logit or hidden vector); the caller reduces it.

    With m = Σ α_i z_Ti, r = σ(m) − y (binary) or softmax(m) − onehot(y) (classes)::

        d gate_term / d s_j = α_j · (r·z_Tj − r·m)
    """
    dt = _compute_dtype(student)
    binary = student.dim() == 1
    zs = student.to(dt)
    zt = teacher.to(dt)
    B, M = zt.shape[:2]
    inv_t = 1.0 / float(temperature)

    if gate == "logit":
        w = gate_weight.to(dt)
        scores = (zt * w + gate_bias.to(dt)) if binary else ((zt * w).sum(-1) + gate_bias.to(dt))
        alpha = torch.softmax(scores, dim=1)
    elif gate == "hidden":
        scores = torch.einsum("bmd,md->bm", teacher_hidden.to(dt), gate_weight.to(dt))
        alpha = torch.softmax(scores + gate_bias.to(dt), dim=1)
    elif gate == "mean":
        alpha = torch.full((B, M), 1.0 / M, device=zt.device, dtype=dt)
    else:  # "fixed"
        alpha = fixed_weights.to(device=zt.device, dtype=dt).expand(B, M)

    xs = zs * inv_t
    if binary:
        if ensemble == "logit":
            p = torch.sigmoid((alpha * zt).sum(1) * inv_t)
        else:
            p = (alpha * torch.sigmoid(zt * inv_t)).sum(1)
        loss = kd_weight * _binary_ce(p, xs)
        grad = (kd_weight * inv_t) * (torch.sigmoid(xs) - p)
    else:
        if ensemble == "logit":
            p = torch.softmax((alpha.unsqueeze(-1) * zt).sum(1) * inv_t, dim=-1)
        else:
            p = (alpha.unsqueeze(-1) * torch.softmax(zt * inv_t, dim=-1)).sum(1)
        loss = kd_weight * _softmax_ce(p, xs)
        grad = (kd_weight * inv_t) * (torch.softmax(xs, dim=-1) - p)

    if labels is not None and hard_weight != 0.0:
        hard, g_hard = _label_ce_with_grad(zs, labels, binary)
        loss = loss + hard_weight * hard
        grad = grad + hard_weight * g_hard

    grad_scores = None
    if gate in TRAINABLE_GATES:
        m = (alpha * zt).sum(1) if binary else (alpha.unsqueeze(-1) * zt).sum(1)  # [B] or [B, C]
        g_term, r = _label_ce_with_grad(m, labels, binary)
        if gate_loss_weight != 0.0:
            loss = loss + gate_loss_weight * g_term
        if binary:
            grad_scores = gate_loss_weight * alpha * (r.unsqueeze(1) * (zt - m.unsqueeze(1)))
        else:
            rz = (zt * r.unsqueeze(1)).sum(-1)  # [B, M]
            rm = (m * r).sum(-1, keepdim=True)  # [B, 1]
            grad_scores = gate_loss_weight * alpha * (rz - rm)

    loss = loss + 0.0 * (zt.sum(1) if binary else zt.sum((1, 2)))
    return loss, grad, grad_scores, alpha


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
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    gate: str,
    gate_weight: Optional[torch.Tensor],
    gate_bias: Optional[torch.Tensor],
    fixed_weights: Optional[torch.Tensor],
    temperature: float,
    hard_weight: float,
    kd_weight: float,
    ensemble: str,
    gate_loss_weight: float,
    grad_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """:func:`gated_distill_loss_fwd_ref` with the gate gradients summed over the batch.

    Returns loss [B], ``grad_scale``·d loss / d z_S, ``grad_scale``·Σ_b d loss_b / d w and
    ``grad_scale``·Σ_b d loss_b / d b (None for gates without parameters), α [B, M]. This is the
    twin of the fused Triton launcher used for ``reduction`` "mean" (``grad_scale`` = 1/B) and
    "sum" (1), which never materialises the per-sample gate gradients.
    """
    loss, grad, grad_scores, alpha = gated_distill_loss_fwd_ref(
        student, teacher, labels, teacher_hidden, gate, gate_weight, gate_bias, fixed_weights,
        temperature, hard_weight, kd_weight, ensemble, gate_loss_weight,
    )
    grad = grad * grad_scale
    if grad_scores is None:
        return loss, grad, None, None, alpha
    feats = teacher_hidden if gate == "hidden" else teacher
    g_w, g_b = gate_param_grads_ref(grad_scores * grad_scale, feats)
    return loss, grad, g_w, g_b, alpha

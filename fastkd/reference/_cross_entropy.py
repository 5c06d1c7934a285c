"""Cross-entropies shared by the loss references: the oracles' (torch's own, autograd) and the
closed forms of the CPU fast path (loss and gradient together)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def ce_oracle(target: torch.Tensor, logits: torch.Tensor, binary: bool) -> torch.Tensor:
    """Per-sample cross-entropy of a target distribution against logits."""
    if binary:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


def hard_oracle(labels: torch.Tensor, logits: torch.Tensor, binary: bool) -> torch.Tensor:
    if binary:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


def softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + e^x) without overflow for any |x| and without torch.softplus's linear cut-off,
    # so the closed-form gradient σ(x) is exactly its derivative.
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def binary_ce(target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # CE(t, z) = -t log σ(z) - (1-t) log σ(-z) = softplus(z) - t·z
    return softplus(z) - target * z


def softmax_ce(target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # -Σ_c t_c log softmax(z)_c = lse(z)·Σ t - Σ t·z
    return torch.logsumexp(z, dim=-1) * target.sum(-1) - (target * z).sum(-1)


def label_ce_with_grad(z: torch.Tensor, labels: torch.Tensor, binary: bool):
    """Per-sample CE(y, z) against hard labels and its gradient: σ(z) − y or softmax(z) − onehot(y)."""
    if binary:
        y = labels.to(z.dtype)
        return binary_ce(y, z), torch.sigmoid(z) - y
    logp = torch.log_softmax(z, dim=-1)
    grad = logp.exp()
    grad.scatter_add_(1, labels.view(-1, 1), torch.full_like(grad[:, :1], -1.0))
    return -logp.gather(1, labels.view(-1, 1)).squeeze(1), grad


def kd_hard_oracle(zs, target, labels, temperature, hard_weight, kd_weight, t2_scale, binary):
    """Oracle of the student's two terms: ``kd_weight·s·CE(target, z_S/T) + hard_weight·CE(y, z_S)``
    (s = T² when ``t2_scale``, else 1)."""
    T = float(temperature)
    kd = ce_oracle(target, zs / T, binary)
    if t2_scale:
        kd = kd * (T * T)
    loss = kd_weight * kd
    if labels is not None and hard_weight != 0.0:
        loss = loss + hard_weight * hard_oracle(labels, zs, binary)
    return loss


def kd_hard_with_grad(zs, target, labels, inv_t, hard_weight, kd_weight, binary):
    """Closed form of the student's two terms against a target distribution and their gradient:

        binary:   d/dz_S = hard_weight·(σ(z_S) − y) + kd_weight·(σ(z_S/T) − p) / T
        classes:  d/dz_S = hard_weight·(softmax(z_S) − onehot(y)) + kd_weight·(softmax(z_S/T) − p) / T

    ``kd_weight`` already includes any T² factor.
    """
    xs = zs * inv_t
    if binary:
        loss = kd_weight * binary_ce(target, xs)
        grad = (kd_weight * inv_t) * (torch.sigmoid(xs) - target)
    else:
        loss = kd_weight * softmax_ce(target, xs)
        grad = (kd_weight * inv_t) * (torch.softmax(xs, dim=-1) - target)
    if labels is not None and hard_weight != 0.0:
        hard, g_hard = label_ce_with_grad(zs, labels, binary)
        loss = loss + hard_weight * hard
        grad = grad + hard_weight * g_hard
    return loss, grad

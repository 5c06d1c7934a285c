"""Teacher gates that can be fitted on honest rows and then frozen (stacking).

The paper's gate ``α = softmax(w·z + b)`` is trained jointly with the student on the student's
training rows, where the teachers' logits are their (over-fitted) predictions on their own
training data: there every teacher looks right, and the gate learns little that holds on new
rows. A *stacked* gate is fitted instead on rows whose teacher logits are honest (out-of-fold
rows of cross-fitted teachers, or validation rows no teacher trained on), stopped on the monitor
rows, and frozen; the student then distils from the fixed per-row target it defines.

Gate inputs (``α = softmax_i(s_i)``):

* ``"logit"``: ``s_i = w_i·z_Ti + b_i`` (the paper's gate);
* ``"hidden"``: ``s_i = w_i·h_Ti + b_i`` (the teachers' last hidden vectors);
* ``"features"``: ``s = MLP(own embeddings of the sample's fields)``, a mixture-of-experts gate
  that can tell which teacher to trust from what the row *is*, not from what the teachers say.

Every gate starts at ``s = 0``, i.e. at plain averaging. Its loss is the paper's gate term,
``CE(y, Σ α_i z_Ti)``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .embedding import MultiFieldEmbedding
from .models.base import MLP

__all__ = ["GateRows", "LogitGate", "HiddenGate", "FeatureGate", "make_gate", "fit_gate", "gate_alpha",
           "ensemble_logits", "GATE_INPUTS"]

GATE_INPUTS = ("logit", "hidden", "features")


@dataclass
class GateRows:
    """Rows a gate is fitted or scored on.

    Shape:
        - ids: int64 ``[N, F]``
        - logits: float32 ``[N, M]`` teachers' logits
        - labels: float32 ``[N]`` (None where only α is wanted)
        - hidden: float32 ``[N, M, d]`` or None
    """

    ids: np.ndarray
    logits: np.ndarray
    labels: Optional[np.ndarray] = None
    hidden: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def batch(self, index: torch.Tensor):
        def take(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a[index.numpy()]))
        return take(self.ids), take(self.logits), take(self.hidden), take(self.labels)


class LogitGate(nn.Module):
    """``s_i = w_i·z_Ti + b_i`` (parameters shaped as :class:`~fastkd.GatedDistillLoss`'s)."""

    def __init__(self, num_teachers: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_teachers))
        self.bias = nn.Parameter(torch.zeros(num_teachers))

    def forward(self, ids, logits, hidden=None) -> torch.Tensor:
        return logits * self.weight + self.bias


class HiddenGate(nn.Module):
    """``s_i = w_i·h_Ti + b_i``."""

    def __init__(self, num_teachers: int, hidden_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_teachers, hidden_dim))
        self.bias = nn.Parameter(torch.zeros(num_teachers))

    def forward(self, ids, logits, hidden=None) -> torch.Tensor:
        if hidden is None:
            raise ValueError("the hidden gate needs the teachers' hidden vectors")
        return (hidden * self.weight).sum(-1) + self.bias


class FeatureGate(nn.Module):
    """Mixture-of-experts gate on the sample's own fields: ``s = W·MLP(concat_f e_f) + b``.

    Its embeddings are its own (small), so it can be fitted before the student exists. The output
    layer starts at zero, so the gate starts at plain averaging.

    Args:
        field_sizes: vocabulary size of each field.
        num_teachers: M.
        embed_dim: width of the gate's own field embeddings.
        hidden_units: MLP widths.

    Shape:
        - Input: ``ids`` int64 ``[B, F]`` (``logits`` and ``hidden`` are ignored).
        - Output: scores ``[B, M]``.
    """

    def __init__(self, field_sizes: Sequence[int], num_teachers: int, embed_dim: int = 8,
                 hidden_units: Sequence[int] = (64,)) -> None:
        super().__init__()
        self.embedding = MultiFieldEmbedding(field_sizes, embed_dim)
        self.mlp = MLP(len(field_sizes) * embed_dim, tuple(hidden_units), dropout=0.0, batch_norm=False)
        self.out = nn.Linear(self.mlp.output_dim, num_teachers)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, ids, logits=None, hidden=None) -> torch.Tensor:
        return self.out(self.mlp(self.embedding(ids).flatten(1)))


def make_gate(kind: str, num_teachers: int, *, hidden_dim: Optional[int] = None,
              field_sizes: Optional[Sequence[int]] = None) -> nn.Module:
    """A fresh gate of input ``kind`` (one of :data:`GATE_INPUTS`), at plain averaging."""
    if kind == "logit":
        return LogitGate(num_teachers)
    if kind == "hidden":
        if not hidden_dim:
            raise ValueError("gate='hidden' needs teachers that declare hidden_dim")
        return HiddenGate(num_teachers, int(hidden_dim))
    if kind == "features":
        if not field_sizes:
            raise ValueError("gate='features' needs the field sizes")
        return FeatureGate(field_sizes, num_teachers)
    raise ValueError(f"gate input must be one of {GATE_INPUTS}, got {kind!r}")


def ensemble_logits(logits: torch.Tensor, alpha: torch.Tensor, ensemble: str = "logit",
                    temperature: float = 1.0) -> torch.Tensor:
    """The teacher logit ``z`` whose ``σ(z/T)`` is the ensemble's soft label.

    ``ensemble="logit"``: ``Σ α_i z_Ti``; ``"prob"``: ``T·logit(Σ α_i σ(z_Ti/T))`` (the
    probability is clamped to ``[1e-7, 1 - 1e-7]``).

    Shape:
        - logits, alpha: ``[N, M]``; output ``[N]``.
    """
    if ensemble == "logit":
        return (alpha * logits).sum(1)
    if ensemble == "prob":
        p = (alpha * torch.sigmoid(logits / temperature)).sum(1).clamp(1e-7, 1 - 1e-7)
        return temperature * torch.logit(p)
    raise ValueError(f"ensemble must be 'logit' or 'prob', got {ensemble!r}")


GATE_ALPHA_BATCH = 16384  # gate_alpha's rows per forward pass


@torch.no_grad()
def gate_alpha(gate: nn.Module, rows: GateRows, batch_size: int = GATE_ALPHA_BATCH) -> torch.Tensor:
    """α ``[N, M]`` of a gate on ``rows`` (eval mode)."""
    was = gate.training
    gate.eval()
    # one output tensor, filled batch by batch (per-batch pieces between the batches' activations
    # fragment the heap on large data; see fastkd.train.evaluation.predict)
    out = torch.zeros(len(rows), rows.logits.shape[1])
    try:
        for a in range(0, len(rows), batch_size):
            b = min(a + batch_size, len(rows))
            ids, z, h, _ = rows.batch(torch.arange(a, b))
            out[a:b] = torch.softmax(gate(ids, z, h), dim=1)
    finally:
        gate.train(was)
    return out


def _gate_loss(gate: nn.Module, ids, z, h, y) -> torch.Tensor:
    alpha = torch.softmax(gate(ids, z, h), dim=1)
    return F.binary_cross_entropy_with_logits((alpha * z).sum(1), y)


@torch.no_grad()
def _row_losses(gate: nn.Module, rows: GateRows, batch_size: int) -> torch.Tensor:
    """Per-row gate loss [N] on ``rows``."""
    alpha = gate_alpha(gate, rows, batch_size)
    z = torch.from_numpy(rows.logits)
    return F.binary_cross_entropy_with_logits((alpha * z).sum(1), torch.from_numpy(rows.labels), reduction="none")


def _monitor_loss(gate: nn.Module, rows: GateRows, batch_size: int) -> float:
    return float(_row_losses(gate, rows, batch_size).mean())


def fit_gate(gate: nn.Module, fit: GateRows, monitor: GateRows, *, lr: float = 1e-2,
             weight_decay: float = 0.0, batch_size: int = 2048, max_epochs: int = 50, patience: int = 2,
             seed: int = 0, min_z: float = 2.0) -> dict:
    """Fit ``gate`` on ``fit`` by the gate loss ``CE(y, Σ α_i z_Ti)``, stop on ``monitor``'s, freeze it.

    Adam; each epoch without improvement of the monitor loss divides the learning rate by 10,
    ``patience`` such epochs stop the fit, and the best epoch's weights are restored. The start
    (plain averaging) counts as epoch 0: a gate that never beats averaging on the monitor rows
    stays at averaging. The best epoch was chosen on the monitor rows, so its edge there is
    flattering; the fitted gate is kept only if its per-row monitor loss beats averaging's by
    more than ``min_z`` standard errors (paired), otherwise the gate is reset to averaging: on a
    few thousand rows a gate that learned nothing real would otherwise ship its noise.
    Deterministic for a given ``seed``. Runs in this process alone (under torch.distributed every
    rank fits the same gate on the same rows).

    Returns:
        ``{"epochs", "best_epoch", "monitor_loss", "uniform_loss", "z", "kept", "history"}``;
        ``uniform_loss`` is the monitor loss of plain averaging, ``z`` the paired improvement over
        it in standard errors, ``kept`` whether the fitted gate was kept.
    """
    if not min_z >= 0:
        raise ValueError(f"min_z must be >= 0, got {min_z}")
    if fit.labels is None or monitor.labels is None:
        raise ValueError("fitting a gate needs labels on the fit and monitor rows")
    if len(fit) == 0 or len(monitor) == 0:
        raise ValueError("fitting a gate needs non-empty fit and monitor rows")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(gate.parameters(), lr=lr, weight_decay=weight_decay)
    # averaging's per-row monitor losses: its mean is epoch 0's value, and the rows pair with the
    # fitted gate's in the significance test below
    uniform_rows = F.binary_cross_entropy_with_logits(torch.from_numpy(monitor.logits).mean(1),
                                                      torch.from_numpy(monitor.labels), reduction="none")
    uniform = float(uniform_rows.mean())
    start_state = copy.deepcopy(gate.state_dict())
    best, best_state, best_epoch, bad = uniform, start_state, 0, 0
    history = []
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        gate.train()
        perm = torch.randperm(len(fit), generator=gen)
        for a in range(0, len(fit), batch_size):
            ids, z, h, y = fit.batch(perm[a:a + batch_size])
            loss = _gate_loss(gate, ids, z, h, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        value = _monitor_loss(gate, monitor, batch_size * 8)
        history.append({"epoch": epoch, "monitor_loss": value})
        if math.isfinite(value) and value < best:
            best, best_state, best_epoch, bad = value, copy.deepcopy(gate.state_dict()), epoch, 0
        else:
            bad += 1
            for g in opt.param_groups:
                g["lr"] *= 0.1
            if bad >= patience:
                break
    gate.load_state_dict(best_state)
    z_score = 0.0
    if best_epoch > 0:
        d = (uniform_rows - _row_losses(gate, monitor, batch_size * 8)).double()
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
        z_score = float(d.mean()) / se if se > 0 else 0.0
    kept = best_epoch > 0 and z_score > min_z
    if not kept:
        gate.load_state_dict(start_state)
        best = uniform
    gate.eval()
    gate.requires_grad_(False)
    return {"epochs": epoch, "best_epoch": best_epoch, "monitor_loss": best, "uniform_loss": uniform,
            "z": z_score, "kept": kept, "history": history}

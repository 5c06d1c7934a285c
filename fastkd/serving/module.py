"""The forward pass that is served: :class:`ServingModel` (one model, ids -> logits, plain torch
ops only, so TorchScript and ONNX can export it) and :class:`EnsembleModel` (teachers' mean logit)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import CTRModel

__all__ = ["ServingModel", "EnsembleModel"]


class ServingModel(nn.Module):
    """A trained :class:`~fastkd.models.CTRModel`'s forward as it is served: ids ``[B, F]`` int64
    -> logits ``[B]`` float32 (``sigmoid`` of a logit is the click probability).

    The same computation as ``model(ids)`` in eval mode, minus the range checks on the ids (they
    read the ids on the host, which no exporter can trace; ids from the model's encoder are always
    in range) and with ``F.embedding`` for the lookup (fastkd's own embedding op is a training
    op). It shares ``model``'s parameters and is always in eval mode (wrapping puts ``model`` in
    eval mode too).

    Args:
        model: a one-hot :class:`~fastkd.models.CTRModel` (every model of :func:`~fastkd.models.build_model`).

    Shape:
        - Input: ``ids`` int64 ``[B, F]``, ``ids[:, f]`` in ``[0, field_sizes[f])``.
        - Output: logits ``[B]``.

    Example:
        >>> import torch
        >>> from fastkd.models import build_model
        >>> model = build_model("dnn", [10, 20], embed_dim=4, hidden_units=(8,)).eval()
        >>> ids = torch.tensor([[1, 2], [9, 19]])
        >>> torch.equal(ServingModel(model)(ids), model(ids))
        True
    """

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        if not isinstance(model, CTRModel):
            raise TypeError(f"expected a fastkd CTRModel (fastkd.models.build_model), got {type(model).__name__}")
        if model.embedding.mode != "onehot":
            raise ValueError("only one-hot embeddings (one id per field) can be served")
        self.model = model
        self.eval()

    def train(self, mode: bool = True) -> "ServingModel":
        return super().train(False)  # a served model never trains: dropout off, BatchNorm frozen

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embedding = self.model.embedding
        flat_ids = ids + embedding._offsets
        emb = F.embedding(flat_ids, embedding.weight)
        return self.model._forward(flat_ids, emb)[0]


class EnsembleModel(nn.Module):
    """The teacher ensemble's serving cost and output: the mean of its teachers' logits (``M``
    forward passes), each :class:`~fastkd.models.CTRModel` through :class:`ServingModel`.

    Args:
        teachers: trained models over the same fields, ids ``[B, F]`` -> logits ``[B]``
            (:class:`~fastkd.models.CTRModel` s, or e.g. the fold averages of cross-fitted teachers).

    Shape:
        - Input: ``ids`` int64 ``[B, F]``.
        - Output: the mean logit ``[B]``.
    """

    def __init__(self, teachers: Sequence[CTRModel]) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("an ensemble needs at least one teacher")
        self.members = nn.ModuleList(ServingModel(t) if isinstance(t, CTRModel) else t for t in teachers)

    def train(self, mode: bool = True) -> "EnsembleModel":
        return super().train(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        total = self.members[0](ids)
        for m in self.members[1:]:
            total = total + m(ids)
        return total / len(self.members)

"""Embedding + MLP models: the DNN student, Wide&Deep and DeepFM."""
from __future__ import annotations

from typing import Tuple

import torch

from .base import CTRModel, FirstOrder
from .layers import fm_interaction

__all__ = ["DNN", "WideDeep", "DeepFM"]


class DNN(CTRModel):
    """Plain embedding + MLP model; the student of the ensemble-KD setup.

    ``logit = w^T MLP(concat_f e_f) + b``.

    Args:
        field_sizes, embed_dim, hidden_units, dropout, batch_norm, embed_reg, sparse, init_std:
            see :class:`~fastkd.models.CTRModel`.

    Shape:
        - Input: ``ids`` int64 ``[B, F]``.
        - Output: logits ``[B]``; ``hidden`` ``[B, hidden_dim]`` is the last MLP layer's output
          (``hidden_dim = hidden_units[-1]``, or ``F * D`` with no hidden layers).

    Example:
        >>> import torch
        >>> model = DNN([10, 20, 5], embed_dim=4, hidden_units=(32, 16))
        >>> ids = torch.tensor([[1, 2, 3], [9, 19, 4]])
        >>> logits, hidden = model(ids, return_hidden=True)
        >>> logits.shape, hidden.shape
        (torch.Size([2]), torch.Size([2, 16]))
    """

    def __init__(self, *args, **kwargs) -> None:  # CTRModel's arguments and defaults
        super().__init__(*args, **kwargs)
        self.mlp = self._mlp(self.flat_embed_dim)
        self.hidden_dim = self.mlp.output_dim
        self.head = self._head(self.hidden_dim)

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mlp(emb.flatten(1))
        return self.head(hidden).squeeze(-1), hidden


class WideDeep(DNN):
    """Wide & Deep: DNN plus a linear ("wide") term over the raw features.

    ``logit = DNN logit + sum_f w[x_f]``. The wide part is linear in the given fields only
    (no hand-made cross-product features, as in most CTR benchmark re-implementations).

    Args:
        see :class:`DNN`.

    Shape:
        - Output: logits ``[B]``; ``hidden`` is the DNN's last hidden layer ``[B, hidden_units[-1]]``
          (the wide term is added to the logit and is not part of it).

    Example:
        >>> import torch
        >>> model = WideDeep([10, 20], embed_dim=4, hidden_units=(8,))
        >>> model(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2])
    """

    # attribute (and state-dict prefix) of the first-order term: "wide" here, "first_order" in
    # DeepFM, as the two models have always named it in checkpoints
    _FIRST_ORDER = "wide"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        setattr(self, self._FIRST_ORDER, FirstOrder(self.embedding))

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = super()._forward(flat_ids, emb)
        return logits + getattr(self, self._FIRST_ORDER)(flat_ids), hidden


class DeepFM(WideDeep):
    """DeepFM: Wide & Deep plus the FM's pairwise term, all on one shared embedding.

    ``logit = sum_f w[x_f] + sum_{i<j} <e_i, e_j> + DNN logit``; arguments as :class:`DNN`, and
    ``hidden`` is the DNN's last hidden layer (the FM terms add to the logit only).

    Example:
        >>> import torch
        >>> DeepFM([10, 20], embed_dim=4, hidden_units=(8,))(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2])
    """

    _FIRST_ORDER = "first_order"

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = super()._forward(flat_ids, emb)
        return logits + fm_interaction(emb), hidden

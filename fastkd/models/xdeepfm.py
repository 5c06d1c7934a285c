"""xDeepFM: linear term + Compressed Interaction Network + DNN."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .base import CTRModel, FirstOrder
from .layers import CIN

__all__ = ["xDeepFM"]


class xDeepFM(CTRModel):  # noqa: N801 (the paper's spelling)
    """xDeepFM: first-order term, CIN (explicit vector-wise interactions) and a DNN.

    ``hidden = concat(CIN(E), MLP(concat_f e_f))``; ``logit = sum_f w[x_f] + w^T hidden + b``
    (one output layer over the concatenation is the same as separate CIN and DNN output units
    summed).

    Args:
        field_sizes, embed_dim, hidden_units, dropout, batch_norm, embed_reg, sparse, init_std:
            see :class:`~fastkd.models.CTRModel`. ``hidden_units=()`` drops the DNN (the
            flattened embeddings then feed the output layer directly).
        cin_layer_units: feature maps per CIN layer. The default (32, 32, 32) suits few-field
            data such as Frappe (the paper used 100-200 maps on Criteo); CIN cost grows with
            the product of adjacent layer widths and is by far the most expensive part here.
        cin_activation: ``"identity"`` (the paper's Eq. 6) or ``"relu"``.

    Shape:
        - Output: logits ``[B]``; ``hidden`` is the concatenated final representation
          ``[B, sum(cin_layer_units) + hidden_units[-1]]`` (the first-order term is added to the
          logit and is not part of it).

    Example:
        >>> import torch
        >>> model = xDeepFM([10, 20, 5], embed_dim=4, hidden_units=(8,), cin_layer_units=(6, 6))
        >>> logits, hidden = model(torch.tensor([[1, 2, 3]]).repeat(3, 1), return_hidden=True)
        >>> hidden.shape
        torch.Size([3, 20])
    """

    def __init__(self, *args, cin_layer_units: Sequence[int] = (32, 32, 32), cin_activation: str = "identity",
                 **kwargs) -> None:  # CTRModel's arguments first
        super().__init__(*args, **kwargs)
        self.first_order = FirstOrder(self.embedding)
        self.cin = CIN(self.num_fields, cin_layer_units, cin_activation)
        self.mlp = self._mlp(self.flat_embed_dim)
        self.hidden_dim = self.cin.output_dim + self.mlp.output_dim
        self.head = self._head(self.hidden_dim)

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.cat([self.cin(emb), self.mlp(emb.flatten(1))], dim=1)
        return self.head(hidden).squeeze(-1) + self.first_order(flat_ids), hidden

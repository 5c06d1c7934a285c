"""Deep & Cross networks: DCN (v1) and DCN-V2."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import CTRModel
from .layers import CrossNet, CrossNetV2

__all__ = ["DCN", "DCNv2"]


class DCN(CTRModel):
    """Deep & Cross Network (v1): a cross network and a DNN in parallel on ``x_0 = concat_f e_f``.

    ``hidden = concat(CrossNet(x_0), MLP(x_0))``; ``logit = w^T hidden + b``.

    Args:
        field_sizes, embed_dim, hidden_units, dropout, batch_norm, embed_reg, sparse, init_std:
            see :class:`~fastkd.models.CTRModel` (``hidden_units=()`` gives a cross-only model).
        num_cross_layers: number of cross layers.

    Shape:
        - Output: logits ``[B]``; ``hidden`` is the concatenated final representation
          ``[B, F*D + hidden_units[-1]]`` (``[B, 2*F*D]`` with no DNN layers).

    Example:
        >>> import torch
        >>> model = DCN([10, 20], embed_dim=4, hidden_units=(8,), num_cross_layers=2)
        >>> logits, hidden = model(torch.tensor([[1, 2], [3, 4]]), return_hidden=True)
        >>> hidden.shape
        torch.Size([2, 16])
    """

    def __init__(self, *args, num_cross_layers: int = 3, **kwargs) -> None:  # CTRModel's arguments first
        super().__init__(*args, **kwargs)
        self.cross = CrossNet(self.flat_embed_dim, num_cross_layers)
        self.mlp = self._mlp(self.flat_embed_dim)
        self.hidden_dim = self.flat_embed_dim + self.mlp.output_dim
        self.head = self._head(self.hidden_dim)

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x0 = emb.flatten(1)
        hidden = torch.cat([self.cross(x0), self.mlp(x0)], dim=1)
        return self.head(hidden).squeeze(-1), hidden


class DCNv2(CTRModel):
    """DCN-V2: matrix cross layers ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` plus a DNN.

    Args:
        field_sizes, embed_dim, hidden_units, dropout, batch_norm, embed_reg, sparse, init_std:
            see :class:`~fastkd.models.CTRModel`.
        num_cross_layers: number of cross layers.
        structure: ``"parallel"`` (cross net and DNN side by side on ``x_0``, outputs
            concatenated) or ``"stacked"`` (DNN on top of the cross net's output).
        low_rank: rank of the factorised cross matrices; ``None`` for full ``(F*D)^2`` matrices.

    Shape:
        - Output: logits ``[B]``; ``hidden`` is ``concat(cross, DNN)`` ``[B, F*D + hidden_units[-1]]``
          for ``"parallel"``, the DNN's last hidden layer ``[B, hidden_units[-1]]`` for
          ``"stacked"`` (``F*D`` with no DNN layers).

    Example:
        >>> import torch
        >>> model = DCNv2([10, 20], embed_dim=4, hidden_units=(8,), structure="stacked")
        >>> logits, hidden = model(torch.tensor([[1, 2], [3, 4]]), return_hidden=True)
        >>> hidden.shape
        torch.Size([2, 8])
    """

    def __init__(self, *args, num_cross_layers: int = 3, structure: str = "parallel", low_rank: Optional[int] = None,
                 **kwargs) -> None:  # CTRModel's arguments first
        super().__init__(*args, **kwargs)
        if structure not in ("parallel", "stacked"):
            raise ValueError(f"structure must be 'parallel' or 'stacked', got {structure!r}")
        self.structure = structure
        self.cross = CrossNetV2(self.flat_embed_dim, num_cross_layers, low_rank)
        self.mlp = self._mlp(self.flat_embed_dim)
        if structure == "parallel":
            self.hidden_dim = self.flat_embed_dim + self.mlp.output_dim
        else:
            self.hidden_dim = self.mlp.output_dim
        self.head = self._head(self.hidden_dim)

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x0 = emb.flatten(1)
        if self.structure == "parallel":
            hidden = torch.cat([self.cross(x0), self.mlp(x0)], dim=1)
        else:
            hidden = self.mlp(self.cross(x0))
        return self.head(hidden).squeeze(-1), hidden

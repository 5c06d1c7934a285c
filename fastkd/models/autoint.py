"""AutoInt: stacked multi-head self-attention over fields (optionally + a DNN: AutoInt+)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .base import CTRModel
from .layers import InteractingLayer

__all__ = ["AutoInt"]


class AutoInt(CTRModel):
    """AutoInt: interacting (self-attention) layers over the field embeddings, with an optional
    parallel DNN (AutoInt+ when ``hidden_units`` is non-empty, the default here).

    ``hidden = concat(flatten(Attn^L(E)), MLP(concat_f e_f))``; ``logit = w^T hidden + b``.

    Args:
        field_sizes, embed_dim, hidden_units, dropout, batch_norm, embed_reg, sparse, init_std:
            see :class:`~fastkd.models.CTRModel`. ``hidden_units=()`` gives plain AutoInt (no
            DNN).
        attention_layers: number of interacting layers.
        num_heads: attention heads per layer.
        attention_dim: per-head width ``d'``.
        residual: residual projection in each interacting layer.

    Shape:
        - Output: logits ``[B]``; ``hidden`` is the concatenated final representation
          ``[B, F*num_heads*attention_dim (+ hidden_units[-1])]``.

    Example:
        >>> import torch
        >>> model = AutoInt([10, 20], embed_dim=4, hidden_units=(), attention_layers=1,
        ...                 num_heads=2, attention_dim=3)
        >>> logits, hidden = model(torch.tensor([[1, 2], [3, 4]]), return_hidden=True)
        >>> hidden.shape
        torch.Size([2, 12])
    """

    def __init__(self, *args, attention_layers: int = 3, num_heads: int = 2, attention_dim: int = 32,
                 residual: bool = True, **kwargs) -> None:  # CTRModel's arguments first
        super().__init__(*args, **kwargs)
        if attention_layers <= 0:
            raise ValueError(f"attention_layers must be positive, got {attention_layers}")
        layers = []
        in_dim = self.embed_dim
        for _ in range(attention_layers):
            layers.append(InteractingLayer(in_dim, attention_dim, num_heads, residual))
            in_dim = layers[-1].output_dim
        self.attention = nn.Sequential(*layers)
        self.attention_out_dim = self.num_fields * in_dim
        self.mlp = self._mlp(self.flat_embed_dim) if self.hidden_units else None
        self.hidden_dim = self.attention_out_dim + (self.mlp.output_dim if self.mlp is not None else 0)
        self.head = self._head(self.hidden_dim)

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.attention(emb).flatten(1)
        if self.mlp is not None:
            hidden = torch.cat([hidden, self.mlp(emb.flatten(1))], dim=1)
        return self.head(hidden).squeeze(-1), hidden

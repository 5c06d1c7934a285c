"""Feature-interaction layers used by the CTR models (FM, cross networks, CIN, self-attention)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fm_interaction", "CrossNet", "CrossNetV2", "CIN", "InteractingLayer"]


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """Second-order FM term ``sum_{i<j} <e_i, e_j>`` per sample.

    Uses the identity ``sum_{i<j} <e_i, e_j> = 0.5 * (||sum_i e_i||^2 - sum_i ||e_i||^2)``, which
    is O(F*D) instead of O(F^2*D).

    Shape:
        - Input: ``[B, F, D]``.
        - Output: ``[B]``.
    """
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class CrossNet(nn.Module):
    """DCN (v1) cross network: ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l``.

    Each layer adds one degree of explicit feature crossing with only ``2 * d`` parameters.

    Args:
        in_dim: width ``d`` of ``x_0`` (``F * D``).
        num_layers: number of cross layers.

    Shape:
        - Input / output: ``[B, in_dim]``.
    """

    def __init__(self, in_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_cross_layers must be positive, got {num_layers}")
        self.num_layers = int(num_layers)
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear(in_dim, 1)'s default scale
        self.weight = nn.Parameter(torch.empty(num_layers, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_layers, in_dim))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in range(self.num_layers):
            # (x . w) is a per-sample scalar: [B, d] @ [d, 1] -> [B, 1]
            x = torch.addcmul(self.bias[layer] + x, x0, x @ self.weight[layer].unsqueeze(1))
        return x


class CrossNetV2(nn.Module):
    """DCN-V2 cross network: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``.

    Args:
        in_dim: width ``d`` of ``x_0``.
        num_layers: number of cross layers.
        low_rank: if set, ``W_l = U_l V_l^T`` with rank ``low_rank`` (the paper's cheaper
            variant for wide inputs); full-rank ``d x d`` matrices otherwise.

    Shape:
        - Input / output: ``[B, in_dim]``.
    """

    def __init__(self, in_dim: int, num_layers: int = 3, low_rank: Optional[int] = None) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_cross_layers must be positive, got {num_layers}")
        if low_rank is not None and low_rank <= 0:
            raise ValueError(f"low_rank must be positive or None, got {low_rank}")
        self.low_rank = low_rank
        if low_rank is None:
            self.layers = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(num_layers))
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(in_dim, low_rank, bias=False), nn.Linear(low_rank, in_dim))
                for _ in range(num_layers)
            )

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = torch.addcmul(x, x0, layer(x))
        return x


class CIN(nn.Module):
    """Compressed Interaction Network of xDeepFM.

    Layer ``k+1`` forms all products of its ``H_k`` feature maps with the ``F`` input fields,
    taken element-wise along the embedding dimension, and compresses the ``H_k * F`` products to
    ``H_{k+1}`` maps with a learned linear map (the paper's 1x1 convolution); every layer is
    sum-pooled over the embedding dimension and the pools are concatenated.

    Internally maps are kept as ``[B, D, H]`` so that the compression is one ``nn.Linear`` over
    the last axis and no transposes are needed between layers.

    Args:
        num_fields: ``F``.
        layer_units: ``H_1, ..., H_L``.
        activation: ``"identity"`` (Eq. 6 of the paper) or ``"relu"``.

    Shape:
        - Input: ``[B, F, D]``.
        - Output: ``[B, sum(layer_units)]``.
    """

    def __init__(self, num_fields: int, layer_units: Sequence[int] = (64, 64, 64), activation: str = "identity") -> None:
        super().__init__()
        units = tuple(int(u) for u in layer_units)
        if not units or any(u <= 0 for u in units):
            raise ValueError(f"cin_layer_units must be non-empty positive ints, got {layer_units!r}")
        if activation not in ("identity", "relu"):
            raise ValueError(f"cin_activation must be 'identity' or 'relu', got {activation!r}")
        self.activation = activation
        self.output_dim = sum(units)
        prev = num_fields
        layers = []
        for u in units:
            layers.append(nn.Linear(prev * num_fields, u))
            prev = u
        self.layers = nn.ModuleList(layers)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        b, nf, d = emb.shape
        x0 = emb.transpose(1, 2)  # [B, D, F]
        xk = x0
        pooled = []
        for layer in self.layers:
            # [B, D, H_k, 1] * [B, D, 1, F] -> [B, D, H_k * F]
            z = (xk.unsqueeze(3) * x0.unsqueeze(2)).reshape(b, d, -1)
            xk = layer(z)
            if self.activation == "relu":
                xk = F.relu(xk)
            pooled.append(xk.sum(dim=1))
        return torch.cat(pooled, dim=1)


class InteractingLayer(nn.Module):
    """AutoInt interacting layer: multi-head self-attention across fields, residual, ReLU.

    Deviation from the paper: attention logits are scaled by ``1/sqrt(attention_dim)`` (standard
    scaled dot-product attention, which lets us use the fused ``F.scaled_dot_product_attention``
    kernel); the paper leaves them unscaled.

    Args:
        in_dim: per-field input width.
        attention_dim: per-head width ``d'``.
        num_heads: number of heads.
        residual: add a linear projection of the input (``W_res e``) before the ReLU.

    Shape:
        - Input: ``[B, F, in_dim]``.
        - Output: ``[B, F, num_heads * attention_dim]``.
    """

    def __init__(self, in_dim: int, attention_dim: int = 32, num_heads: int = 2, residual: bool = True) -> None:
        super().__init__()
        if attention_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"attention_dim and num_heads must be positive, got {attention_dim}, {num_heads}"
            )
        self.attention_dim = int(attention_dim)
        self.num_heads = int(num_heads)
        self.output_dim = self.attention_dim * self.num_heads
        self.qkv = nn.Linear(in_dim, 3 * self.output_dim, bias=False)
        self.residual = nn.Linear(in_dim, self.output_dim, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, nf, _ = x.shape
        # [B, F, 3, H, d'] -> three [B, H, F, d']
        q, k, v = self.qkv(x).view(b, nf, 3, self.num_heads, self.attention_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, nf, self.output_dim)
        if self.residual is not None:
            out = out + self.residual(x)
        return F.relu(out)

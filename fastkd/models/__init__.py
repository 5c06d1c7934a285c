"""CTR models for ensemble knowledge distillation, all built on one
:class:`~fastkd.embedding.MultiFieldEmbedding`.

Every model maps per-field ids ``[B, F]`` to logits ``[B]`` and, with ``return_hidden=True``,
also returns its last hidden representation (for hint losses and hidden-vector gating).

Example:
    >>> import torch
    >>> from fastkd.models import build_model
    >>> model = build_model("deepfm", [10, 20, 5], embed_dim=4, hidden_units=(16,))
    >>> model(torch.tensor([[0, 1, 2], [9, 19, 4]])).shape
    torch.Size([2])
"""
from __future__ import annotations

from typing import Dict, Sequence, Type

from .autoint import AutoInt
from .base import MLP, CTRModel, FastDropout, FirstOrder, ReLUDropout
from .dcn import DCN, DCNv2
from .dnn import DNN, DeepFM, WideDeep
from .layers import CIN, CrossNet, CrossNetV2, InteractingLayer, fm_interaction
from .xdeepfm import xDeepFM

__all__ = [
    "CTRModel", "MLP", "FirstOrder", "FastDropout", "ReLUDropout",
    "DNN", "WideDeep", "DeepFM", "DCN", "DCNv2", "xDeepFM", "AutoInt",
    "CIN", "CrossNet", "CrossNetV2", "InteractingLayer", "fm_interaction",
    "MODELS", "build_model",
]

MODELS: Dict[str, Type[CTRModel]] = {
    "dnn": DNN,
    "widedeep": WideDeep,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dcnv2": DCNv2,
    "xdeepfm": xDeepFM,
    "autoint": AutoInt,
}


def build_model(name: str, field_sizes: Sequence[int], **kwargs) -> CTRModel:
    """Construct a registered model by (case-insensitive) name.

    Args:
        name: one of :data:`MODELS`' keys (``"dnn"``, ``"widedeep"``, ``"deepfm"``, ``"dcn"``,
            ``"dcnv2"``, ``"xdeepfm"``, ``"autoint"``).
        field_sizes: vocabulary size of each field.
        **kwargs: constructor arguments of the model (``embed_dim``, ``hidden_units``, ...).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).

    Example:
        >>> build_model("dnn", [3, 4], hidden_units=(8,)).hidden_dim
        8
    """
    key = str(name).lower()
    if key not in MODELS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[key](field_sizes, **kwargs)

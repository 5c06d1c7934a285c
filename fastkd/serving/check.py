"""How close an exported model is to PyTorch: the largest logit difference on the same rows and,
with labels, both AUCs (:func:`compare_logits`)."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from ..metrics import roc_auc

__all__ = ["compare_logits", "TOLERANCE"]

#: the largest |exported logit - PyTorch logit| an export may show (float32 arithmetic in another order)
TOLERANCE = 1e-5


def compare_logits(reference, exported, labels: Optional[np.ndarray] = None) -> Dict[str, object]:
    """``{"rows", "max_abs_diff", "within_tolerance"}`` of two logit vectors (PyTorch's first),
    plus ``"auc_pytorch"`` and ``"auc_exported"`` when ``labels`` has both classes."""
    a = (reference.detach().cpu().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference))
    b = (exported.detach().cpu().numpy() if isinstance(exported, torch.Tensor) else np.asarray(exported))
    a, b = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape[0]} reference logits but {b.shape[0]} exported ones")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    out: Dict[str, object] = {"rows": int(a.size), "max_abs_diff": diff,
                              "within_tolerance": bool(diff <= TOLERANCE)}  # NaN fails too
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if 0 < y.sum() < y.size:
            out["auc_pytorch"] = roc_auc(y, a)
            out["auc_exported"] = roc_auc(y, b)
    return out

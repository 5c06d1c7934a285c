"""Evaluation metrics for CTR models: ROC AUC and log loss, exact and dependency-free."""
from __future__ import annotations

import numpy as np

__all__ = ["roc_auc", "log_loss"]


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve, ties in ``scores`` counted as half (the Mann–Whitney U statistic).

    Args:
        labels: 0/1 labels, shape [N].
        scores: predicted scores (logits or probabilities; only their order matters), shape [N].

    Example::

        >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    n_pos = float((y > 0.5).sum())
    n_neg = float(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC is undefined when only one class is present")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average rank of each group of tied scores (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], s_sorted.shape[0]]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty_like(s)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y > 0.5].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped to [eps, 1 - eps]).

    Example::

        >>> round(log_loss([1, 0], [0.9, 0.2]), 4)
        0.1643
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1 - eps)
    if y.shape != p.shape:
        raise ValueError(f"labels and probs differ in length: {y.shape[0]} vs {p.shape[0]}")
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())

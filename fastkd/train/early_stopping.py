"""The early-stopping rule: the best epoch of the monitored value and its weights."""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import MONITORS

__all__ = ["EarlyStopper", "improves"]


def improves(value: float, best: Optional[float], mode: str) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) under ``mode`` ("max" | "min"); a
    non-finite value never does."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class EarlyStopper:
    """Tracks the monitored value, the best epoch and its weights.

    ``average=k > 1``: the weights kept for the best epoch are the mean of the last ``k`` epochs'
    (those of its monitor window; fewer at the start), floating-point tensors averaged and the
    others (counters) taken from the last epoch.
    """

    def __init__(self, monitor: str, patience: int, average: int = 1) -> None:
        self.mode = MONITORS[monitor]
        self.patience = patience
        self.average = average
        self.best: Optional[float] = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.best_state: Optional[dict] = None
        self.recent: List[dict] = []  # the last `average` epochs' weights (average > 1 only)

    def step(self, value: float, epoch: int, modules: Dict[str, nn.Module]) -> bool:
        """Record an epoch's value; returns True when it improved on the best so far."""
        if self.average > 1:
            self.recent = (self.recent + [_snapshot(modules)])[-self.average:]
        improved = improves(value, self.best, self.mode)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = _mean_state(self.recent) if self.average > 1 else _snapshot(modules)
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        sd = {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
              "best_state": self.best_state}
        if self.average > 1:  # a resumed run averages the same epochs (absent otherwise: old format)
            sd["recent"] = self.recent
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.best, self.best_epoch = sd["best"], sd["best_epoch"]
        self.bad_epochs, self.best_state = sd["bad_epochs"], sd["best_state"]
        self.recent = list(sd.get("recent", []))


def _snapshot(modules: Dict[str, nn.Module]) -> dict:
    """A copy of every module's weights, ``{name: state_dict}``."""
    return {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}


def _mean_state(states: List[dict]) -> dict:
    """The element-wise mean of several ``{module: state_dict}`` snapshots (floating-point
    tensors; other entries from the last snapshot)."""
    last = states[-1]
    out = {}
    for k, sd in last.items():
        out[k] = {}
        for name, t in sd.items():
            if torch.is_tensor(t) and t.is_floating_point():
                out[k][name] = torch.stack([s[k][name] for s in states]).mean(0).to(t.dtype)
            else:
                out[k][name] = copy.deepcopy(t)
    return out

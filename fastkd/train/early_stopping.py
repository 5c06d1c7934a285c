"""The early-stopping rule: the best epoch of the monitored value and its weights."""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional

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
    """Tracks the monitored value, the best epoch and its weights."""

    def __init__(self, monitor: str, patience: int) -> None:
        self.mode = MONITORS[monitor]
        self.patience = patience
        self.best: Optional[float] = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.best_state: Optional[dict] = None

    def step(self, value: float, epoch: int, modules: Dict[str, nn.Module]) -> bool:
        """Record an epoch's value; returns True when it improved on the best so far."""
        improved = improves(value, self.best, self.mode)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state}

    def load_state_dict(self, sd: dict) -> None:
        self.best, self.best_epoch = sd["best"], sd["best_epoch"]
        self.bad_epochs, self.best_state = sd["bad_epochs"], sd["best_state"]

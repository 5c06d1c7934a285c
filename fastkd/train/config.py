"""Training settings shared by teachers, baselines and students: :class:`TrainConfig`."""
from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..data import CTRData

__all__ = ["TrainConfig", "MONITORS", "seed_everything"]

MONITORS = {"auc": "max", "logloss": "min", "kd": "min"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    """Optimisation and stopping settings shared by teachers, baselines and students.

    Args:
        max_epochs: upper bound on epochs.
        batch_size: training batch size; under torch.distributed the global batch (each of W
            ranks takes ``batch_size // W`` rows a step).
        lr: Adam learning rate.
        early_stop: "auc" | "logloss" (validation labels) | "kd" (distillation loss; students).
        patience: epochs without improvement before stopping (None: 2 for auc/logloss, 3 for kd).
        reduce_lr_on_plateau: divide the learning rate by 10 after each epoch without improvement.
        eval_batch_size: batch size for scoring.
        merge_validation: train on the validation split too, except a held-out
            ``monitor_fraction`` of it (its first rows) that monitors the stopping quantity
            (distillation loss, or labels for "auc"/"logloss").
        monitor_fraction: share of the validation split held out as the monitor split (default
            0.5: at 0.2 Frappe's monitor had ~1.7K rows and stopping followed noise).
        monitor_window: decide on the mean of the last ``monitor_window`` epochs' monitored
            values instead of the last one alone: on a few thousand monitor rows an epoch's AUC
            moves by noise as much as by learning, and one noisy dip would cut the learning
            rate or stop training early. The best epoch is the one whose smoothed value was best.
            Default 3 (docs/accuracy.md).
        average_window: restore the mean of the weights of the epochs in the best monitor window
            (checkpoint averaging over ``monitor_window`` epochs) instead of the window's last
            epoch. Students and plain models only: :meth:`for_teachers` turns it off, so teachers
            shared by every row of a run stay the same. Default False.
        grad_clip_norm: clip the dense parameters' gradients to this total 2-norm before each
            step (FuxiCTR's trainer clips at 10); None (default): no clipping. Students and plain
            models only (:meth:`for_teachers` turns it off). Not yet a default: docs/accuracy.md
            has the first measurements.
        seed: seeds initialisation and data order.
        steps_per_epoch: train at most this many batches an epoch (None: all). Each epoch's
            permutation still spans every row, so a capped epoch is a uniform sample of them: for
            scale runs and quick checks on data too large to pass over in full.
        progress: show tqdm progress bars (default: when stderr is a terminal).
        precision: "fp32", or "bf16" to run the training forward passes under
            ``torch.autocast(dtype=torch.bfloat16)`` (weights, optimizer and losses stay float32).
            On CPUs with AMX (Sapphire Rapids and later) this is several times faster; scoring
            for early stopping and evaluation always runs in float32.
        row_blocks: None (default): each epoch permutes all training rows (under
            ``torch.distributed``, dealt to ranks like ``DistributedSampler``). An int ``W``: the
            rows are cut into ``W`` contiguous blocks (:func:`fastkd.distributed.shard_bounds`),
            each epoch permutes every block on its own, and step ``k`` takes the ``k``-th
            ``batch_size // W`` rows of every block. Under ``torch.distributed`` ``W`` must be the
            world size and rank ``r``'s epochs read block ``r`` only (the passes before them,
            e.g. the gate's targets, still read every row); one process with the same ``W``
            takes the same steps (``docs/distributed.md``).
    """

    max_epochs: int = 50
    batch_size: int = 2048
    lr: float = 1e-3
    early_stop: str = "auc"
    patience: Optional[int] = None
    reduce_lr_on_plateau: bool = True
    eval_batch_size: int = 16384
    merge_validation: bool = False
    monitor_fraction: float = 0.5
    monitor_window: int = 3
    seed: int = 0
    steps_per_epoch: Optional[int] = None
    progress: Optional[bool] = None
    precision: str = "fp32"
    row_blocks: Optional[int] = None
    average_window: bool = False
    grad_clip_norm: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("max_epochs", "batch_size", "eval_batch_size", "seed") + (("patience",) if self.patience is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.monitor_fraction, bool) or not isinstance(self.monitor_fraction, (int, float)):
            raise ValueError(f"monitor_fraction must be a number in (0, 1), got {self.monitor_fraction!r}")
        if not isinstance(self.reduce_lr_on_plateau, bool):
            raise ValueError(f"reduce_lr_on_plateau must be True or False, got {self.reduce_lr_on_plateau!r}")
        if self.early_stop not in MONITORS:
            raise ValueError(f"early_stop must be one of {tuple(MONITORS)}, got {self.early_stop!r}")
        if self.patience is None:
            self.patience = 3 if self.early_stop == "kd" else 2
        if self.steps_per_epoch is not None and (isinstance(self.steps_per_epoch, bool) or
                                                 int(self.steps_per_epoch) != self.steps_per_epoch or
                                                 self.steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be None or an int >= 1, got {self.steps_per_epoch!r}")
        if self.patience < 1 or self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("patience, max_epochs and batch_size must be >= 1")
        if isinstance(self.monitor_window, bool) or not isinstance(self.monitor_window, int) or self.monitor_window < 1:
            raise ValueError(f"monitor_window must be an int >= 1, got {self.monitor_window!r}")
        if not 0.0 < self.monitor_fraction < 1.0:
            raise ValueError(f"monitor_fraction must be in (0, 1), got {self.monitor_fraction}")
        if self.row_blocks is not None and (isinstance(self.row_blocks, bool) or not isinstance(self.row_blocks, int)
                                            or self.row_blocks < 1):
            raise ValueError(f"row_blocks must be None or an int >= 1, got {self.row_blocks!r}")
        if self.grad_clip_norm is not None and (isinstance(self.grad_clip_norm, bool) or not isinstance(
                self.grad_clip_norm, (int, float)) or not 0 < self.grad_clip_norm < float("inf")):
            raise ValueError(f"grad_clip_norm must be None or a finite number > 0, got {self.grad_clip_norm!r}")
        if not isinstance(self.average_window, bool):
            raise ValueError(f"average_window must be True or False, got {self.average_window!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")

    def for_teachers(self) -> "TrainConfig":
        """The settings teachers train with: these, but stopped on validation AUC when these stop on
        the distillation loss (teachers have none), without merged validation, window averaging
        and gradient clipping (the student network's options: a run's teachers stay the same
        whatever its student rows set)."""
        if (self.early_stop != "kd" and not self.merge_validation and not self.average_window
                and self.grad_clip_norm is None):
            return self
        early_stop = "auc" if self.early_stop == "kd" else self.early_stop
        return dataclasses.replace(self, early_stop=early_stop, patience=None if early_stop != self.early_stop
                                   else self.patience, merge_validation=False, average_window=False,
                                   grad_clip_norm=None)

    def monitor_rows(self, n_valid: int) -> int:
        """How many of ``n_valid`` validation rows (its first ones) are the monitor split under
        ``merge_validation``: ``monitor_fraction`` of them, at least one."""
        return max(1, int(round(self.monitor_fraction * n_valid)))

    def split_validation(self, train: CTRData, valid: CTRData) -> Tuple[CTRData, CTRData]:
        """``(training data, monitor data)`` under these settings: ``(train, valid)``, or with
        ``merge_validation`` the train split plus the validation rows after the first
        ``monitor_fraction``, and those first rows as the monitor split."""
        if not self.merge_validation:
            return train, valid
        k = self.monitor_rows(len(valid))
        if k >= len(valid):
            raise ValueError(f"merge_validation needs a validation split of at least 2 rows, got {len(valid)}")
        return CTRData.concat([train, valid.subset(np.arange(k, len(valid)))]), valid.subset(np.arange(k))

    @property
    def show_progress(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else bool(self.progress)

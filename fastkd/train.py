"""Training: plain models, pre-train and co-train distillation, early stopping, checkpoints.

The loops index whole-dataset tensors directly (one gather per epoch for the shuffle, then
contiguous slices): at CTR batch sizes a ``DataLoader`` costs more than the model.

Early stopping, exactly (see :class:`TrainConfig`):

* ``early_stop="auc"`` / ``"logloss"``: after each epoch the model is scored on the validation
  split (labels); the best epoch's weights are restored at the end.
* ``early_stop="kd"`` (the paper's rule, student only): after each epoch the *distillation term*
  ``CE(target, z_S/T)`` (no label terms) is averaged over the monitor split, whose targets come
  from the frozen teachers. With ``merge_validation=False`` the monitor split is the validation
  split; with ``merge_validation=True`` the validation split is cut in two: its first
  ``monitor_fraction`` (by the split order) is held out as the monitor split and the rest is added
  to the student's training data.
* ``merge_validation=True`` with ``"auc"`` / ``"logloss"``: the same cut, the held-out slice's
  *labels* are monitored. This is the label-stopped baseline with the same training data as a
  student stopped on the distillation loss with merged validation (so a gain of that student over
  it is not just the extra rows).

``patience`` counts epochs without improvement; with ``reduce_lr_on_plateau`` each such epoch
also divides the learning rate by 10 (FuxiCTR's schedule).

Under ``torch.distributed`` (a process group initialised, e.g. by ``torchrun`` and
:func:`fastkd.distributed.init_process_group`), every loop here runs data-parallel without other
changes to the calling code (see ``docs/distributed.md``):

* the trainable modules of a run are wrapped once in ``DistributedDataParallel`` (frozen teachers
  never are; in co-training teachers, gate and student are one wrapped module);
* each epoch's permutation is the single-process one, dealt to ranks as ``DistributedSampler``
  does, and ``batch_size`` is the *global* batch: each of W ranks takes ``batch_size // W`` rows a
  step, so the rows of one step over all ranks are the rows of one single-process batch;
* stopping quantities are computed on predictions gathered from every rank (AUC, logloss) or
  summed over ranks (distillation loss), and rank 0's value decides for everyone;
* ``BatchNorm1d`` layers normalise with the statistics of the global batch
  (:func:`fastkd.distributed.sync_batch_norm`);
* only rank 0 writes checkpoints; :class:`TeacherCache` is built in parallel.

With no process group (or a group of one) nothing of this runs and results are unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import distributed as _dist
from .data import CTRData
from .losses import GatedDistillLoss, HintLoss
from .metrics import log_loss, roc_auc

__all__ = [
    "TrainConfig", "EarlyStopper", "TeacherCache", "Distiller", "train_model", "predict",
    "evaluate", "seed_everything", "atomic_save",
]

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
        monitor_fraction: share of the validation split held out as the monitor split.
        seed: seeds initialisation and data order.
        progress: show tqdm progress bars (default: when stderr is a terminal).
        precision: "fp32", or "bf16" to run the training forward passes under
            ``torch.autocast(dtype=torch.bfloat16)`` (weights, optimizer and losses stay float32).
            On CPUs with AMX (Sapphire Rapids and later) this is several times faster; scoring
            for early stopping and evaluation always runs in float32.
    """

    max_epochs: int = 50
    batch_size: int = 2048
    lr: float = 1e-3
    early_stop: str = "auc"
    patience: Optional[int] = None
    reduce_lr_on_plateau: bool = True
    eval_batch_size: int = 16384
    merge_validation: bool = False
    monitor_fraction: float = 0.2
    seed: int = 0
    progress: Optional[bool] = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.early_stop not in MONITORS:
            raise ValueError(f"early_stop must be one of {tuple(MONITORS)}, got {self.early_stop!r}")
        if self.patience is None:
            self.patience = 3 if self.early_stop == "kd" else 2
        if self.patience < 1 or self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("patience, max_epochs and batch_size must be >= 1")
        if not 0.0 < self.monitor_fraction < 1.0:
            raise ValueError(f"monitor_fraction must be in (0, 1), got {self.monitor_fraction}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")

    def for_teachers(self) -> "TrainConfig":
        """The settings teachers train with: these, but stopped on validation AUC when these stop on
        the distillation loss (teachers have none) and without merged validation."""
        if self.early_stop != "kd" and not self.merge_validation:
            return self
        early_stop = "auc" if self.early_stop == "kd" else self.early_stop
        return dataclasses.replace(self, early_stop=early_stop, patience=None if early_stop != self.early_stop
                                   else self.patience, merge_validation=False)

    def split_validation(self, train: CTRData, valid: CTRData) -> Tuple[CTRData, CTRData]:
        """``(training data, monitor data)`` under these settings: ``(train, valid)``, or with
        ``merge_validation`` the train split plus the validation rows after the first
        ``monitor_fraction``, and those first rows as the monitor split."""
        if not self.merge_validation:
            return train, valid
        k = max(1, int(round(self.monitor_fraction * len(valid))))
        if k >= len(valid):
            raise ValueError(f"merge_validation needs a validation split of at least 2 rows, got {len(valid)}")
        return CTRData.concat([train, valid.subset(np.arange(k, len(valid)))]), valid.subset(np.arange(k))

    @property
    def show_progress(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else bool(self.progress)


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
        if not math.isfinite(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            improved = value > self.best if self.mode == "max" else value < self.best
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


def atomic_save(obj, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash mid-write
    leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _as_tensors(data: CTRData) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.ids), torch.from_numpy(data.labels)


@torch.no_grad()
def predict(model: nn.Module, data: Union[CTRData, torch.Tensor], batch_size: int = 16384,
            return_hidden: bool = False):
    """Logits [N] (and hidden [N, d] with ``return_hidden``) of ``model`` in eval mode."""
    ids = torch.from_numpy(data.ids) if isinstance(data, CTRData) else data
    was_training = model.training
    model.eval()
    logits, hidden = [], []
    try:
        for i in range(0, ids.shape[0], batch_size):
            out = model(ids[i:i + batch_size], return_hidden=return_hidden)
            if return_hidden:
                logits.append(out[0])
                hidden.append(out[1])
            else:
                logits.append(out)
    finally:
        model.train(was_training)
    z = torch.cat(logits) if logits else torch.zeros(0)
    return (z, torch.cat(hidden)) if return_hidden else z


def scores(labels: np.ndarray, logits: torch.Tensor) -> Dict[str, float]:
    z = logits.detach().double().numpy()
    return {"auc": roc_auc(labels, z), "logloss": log_loss(labels, 1.0 / (1.0 + np.exp(-z)))}


def evaluate(model: nn.Module, data: CTRData, batch_size: int = 16384) -> Dict[str, float]:
    """Test metrics of ``model`` on ``data``: {"auc", "logloss"}."""
    return scores(data.labels, predict(model, data, batch_size))


# ------------------------------------------------------------------------------------------------
# Teacher cache
# ------------------------------------------------------------------------------------------------
class TeacherCache:
    """Frozen teachers' outputs for every sample of a dataset, computed once.

    Row ``i`` holds the M teachers' logits (and, when requested, their hidden vectors) for sample
    ``i`` of the dataset it was built on, so a pre-train student epoch reads them by index and
    never runs a teacher. With ``path`` the arrays live in memory-mapped ``.npy`` files (for data
    larger than RAM); they are written under temporary names and renamed only when complete, so
    an interrupted build never leaves a cache that a later run would trust.

    Under torch.distributed, :meth:`build` is a collective: each rank runs the teachers on its
    contiguous block of rows only. In memory the blocks are gathered so every rank holds the whole
    cache; with ``path`` each rank writes its own part files and rank 0 writes the metadata that
    lists them once every part is complete, and :meth:`load` presents the parts as one cache.

    Shape:
        - ``logits``: [N, M] float32
        - ``hidden``: [N, M, d] float32, or None
    """

    META = "cache.json"

    def __init__(self, logits, hidden=None) -> None:
        self.logits = torch.as_tensor(np.asarray(logits))
        self.hidden = None if hidden is None else torch.as_tensor(np.asarray(hidden))
        if self.logits.dim() != 2:
            raise ValueError(f"logits must be [N, M], got {list(self.logits.shape)}")
        if self.hidden is not None and tuple(self.hidden.shape[:2]) != tuple(self.logits.shape):
            raise ValueError("hidden must be [N, M, d] with the logits' N and M")

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def num_teachers(self) -> int:
        return self.logits.shape[1]

    def gather(self, index: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = None if self.hidden is None else self.hidden[index]
        return self.logits[index], h

    @classmethod
    def build(cls, teachers: Sequence[nn.Module], data: Union[CTRData, torch.Tensor], *,
              hidden: bool = False, batch_size: int = 16384, path: Optional[Union[str, Path]] = None,
              progress: bool = False, shard: Optional[bool] = None) -> "TeacherCache":
        """Run each teacher once over ``data`` (eval mode, no grad) and store its outputs.

        ``shard`` (default: whether a process group of more than one rank exists) splits the
        work across ranks; every rank must then call ``build`` with the same arguments, and
        ``path``, if given, must be a folder every rank sees. ``shard=False`` builds the whole
        cache in this process alone.
        """
        ids = torch.from_numpy(data.ids) if isinstance(data, CTRData) else data
        n, m = ids.shape[0], len(teachers)
        if m == 0:
            raise ValueError("teachers is empty")
        # Teachers of different hidden widths are zero-padded to the widest: exact for the hidden
        # gate and for hint losses, whose per-teacher weights meet the padding only as zeros.
        d = max(int(getattr(t, "hidden_dim", 0)) for t in teachers) if hidden else 0
        if hidden and d < 1:
            raise ValueError("hidden vectors requested but the teachers declare no hidden_dim")
        if (_dist.get_world_size() > 1) if shard is None else shard:
            return cls._build_sharded(teachers, ids, hidden, d, batch_size, path, progress)
        if path is not None:
            path = Path(path)
            path.mkdir(parents=True, exist_ok=True)
            # a metadata file left by an earlier build must not vouch for arrays about to change
            (path / cls.META).unlink(missing_ok=True)
            tmp_l, tmp_h = path / "logits.npy.tmp", path / "hidden.npy.tmp"
            logits = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, m))
            hid = np.lib.format.open_memmap(tmp_h, mode="w+", dtype=np.float32, shape=(n, m, d)) if hidden else None
        else:
            logits = np.empty((n, m), dtype=np.float32)
            hid = np.empty((n, m, d), dtype=np.float32) if hidden else None
        _fill_teacher_outputs(teachers, ids, logits, hid, batch_size, progress)
        if path is None:
            return cls(logits, hid)
        logits.flush()
        del logits
        os.replace(tmp_l, path / "logits.npy")
        if hidden:
            hid.flush()
            del hid
            os.replace(tmp_h, path / "hidden.npy")
        elif (path / "hidden.npy").exists():
            os.unlink(path / "hidden.npy")
        # the metadata file is written last: its presence marks a complete cache
        _write_json(path / cls.META, {"rows": n, "teachers": m, "hidden_dim": d if hidden else None})
        return cls.load(path)

    @classmethod
    def _build_sharded(cls, teachers, ids: torch.Tensor, hidden: bool, d: int, batch_size: int,
                       path: Optional[Union[str, Path]], progress: bool) -> "TeacherCache":
        n, m = ids.shape[0], len(teachers)
        rank, world = _dist.get_rank(), _dist.get_world_size()
        a, b = _dist.shard_bounds(n)
        progress = progress and rank == 0
        if path is None:
            logits = np.empty((b - a, m), dtype=np.float32)
            hid = np.empty((b - a, m, d), dtype=np.float32) if hidden else None
            _fill_teacher_outputs(teachers, ids[a:b], logits, hid, batch_size, progress)
            full_h = None if hid is None else _dist.gather_rows(torch.from_numpy(hid), n)
            return cls(_dist.gather_rows(torch.from_numpy(logits), n), full_h)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            (path / cls.META).unlink(missing_ok=True)
        _dist.barrier()
        stem = f"part{rank:05d}-of-{world:05d}"
        names = {"logits": f"{stem}.logits.npy", "hidden": f"{stem}.hidden.npy" if hidden else None}
        # this part's own marker goes first and comes back last: present means complete
        (path / f"{stem}.json").unlink(missing_ok=True)
        tmp_l = path / (names["logits"] + ".tmp")
        logits = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(b - a, m))
        hid = None
        if hidden:
            tmp_h = path / (names["hidden"] + ".tmp")
            hid = np.lib.format.open_memmap(tmp_h, mode="w+", dtype=np.float32, shape=(b - a, m, d))
        _fill_teacher_outputs(teachers, ids[a:b], logits, hid, batch_size, progress)
        logits.flush()
        del logits
        os.replace(tmp_l, path / names["logits"])
        if hidden:
            hid.flush()
            del hid
            os.replace(tmp_h, path / names["hidden"])
        _write_json(path / f"{stem}.json", {"start": a, "stop": b, "teachers": m,
                                            "hidden_dim": d if hidden else None, **names})
        # a rank that died before its marker makes this barrier fail, so no metadata is written
        _dist.barrier()
        if rank == 0:
            parts = []
            for r in range(world):
                part = json.loads((path / f"part{r:05d}-of-{world:05d}.json").read_text())
                if (part["start"], part["stop"]) != _dist.shard_bounds(n, r, world) or part["teachers"] != m:
                    raise RuntimeError(f"{path}: part {r} of {world} does not match this build: {part}")
                parts.append(part)
            _write_json(path / cls.META, {"rows": n, "teachers": m, "hidden_dim": d if hidden else None,
                                          "parts": parts})
        _dist.barrier()
        return cls.load(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TeacherCache":
        """Open a cache written by :meth:`build` (memory-mapped, read-only); a cache written in
        parts by several ranks reads as one."""
        path = Path(path)
        if not (path / cls.META).exists():
            raise FileNotFoundError(f"{path} holds no complete teacher cache (no {cls.META})")
        meta = json.loads((path / cls.META).read_text())
        if "parts" in meta:
            return cls._load_parts(path, meta)
        logits = np.load(path / "logits.npy", mmap_mode="r")
        hidden = np.load(path / "hidden.npy", mmap_mode="r") if meta["hidden_dim"] else None
        if logits.shape != (meta["rows"], meta["teachers"]):
            raise ValueError(f"{path}: logits.npy has shape {logits.shape}, metadata says {meta}")
        # torch.as_tensor cannot wrap a read-only memmap without a copy; index through numpy
        cache = cls.__new__(cls)
        cache.logits = _MemmapRows(logits)
        cache.hidden = None if hidden is None else _MemmapRows(hidden)
        return cache

    @classmethod
    def _load_parts(cls, path: Path, meta: dict) -> "TeacherCache":
        parts = meta["parts"]
        starts = [p["start"] for p in parts]
        logits = [np.load(path / p["logits"], mmap_mode="r") for p in parts]
        for p, arr in zip(parts, logits):
            if arr.shape != (p["stop"] - p["start"], meta["teachers"]):
                raise ValueError(f"{path}: {p['logits']} has shape {arr.shape}, metadata says {p}")
        if parts[-1]["stop"] != meta["rows"]:
            raise ValueError(f"{path}: parts cover {parts[-1]['stop']} rows, metadata says {meta['rows']}")
        cache = cls.__new__(cls)
        cache.logits = _PartRows(logits, starts)
        cache.hidden = None
        if meta["hidden_dim"]:
            cache.hidden = _PartRows([np.load(path / p["hidden"], mmap_mode="r") for p in parts], starts)
        return cache


def _fill_teacher_outputs(teachers, ids: torch.Tensor, logits: np.ndarray, hid: Optional[np.ndarray],
                          batch_size: int, progress: bool) -> None:
    """Write the teachers' logits [N, M] (and hidden vectors [N, M, d], zero-padded) in place."""
    from tqdm.auto import tqdm

    hidden = hid is not None
    for j, t in enumerate(tqdm(teachers, desc="teacher cache", disable=not progress, leave=False)):
        out = predict(t, ids, batch_size, return_hidden=hidden)
        if hidden:
            logits[:, j] = out[0].float().numpy()
            h = out[1].float().numpy()
            hid[:, j, : h.shape[1]] = h
            hid[:, j, h.shape[1]:] = 0.0
        else:
            logits[:, j] = out.float().numpy()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class _PartRows:
    """Row access to consecutive read-only memory-mapped blocks as if they were one array."""

    def __init__(self, parts: List[np.ndarray], starts: List[int]) -> None:
        self.parts = parts
        self.starts = np.asarray(starts, dtype=np.int64)
        self.shape = torch.Size((sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:]))

    def __getitem__(self, index) -> torch.Tensor:
        idx = index.numpy() if isinstance(index, torch.Tensor) else index
        idx = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(idx.shape + tuple(self.shape[1:]), dtype=self.parts[0].dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][idx[sel] - self.starts[p]]
        return torch.from_numpy(out)

    def dim(self) -> int:
        return len(self.shape)


class _MemmapRows:
    """Row access to a read-only memory-mapped array, returning tensors."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.shape = torch.Size(arr.shape)

    def __getitem__(self, index) -> torch.Tensor:
        idx = index.numpy() if isinstance(index, torch.Tensor) else index
        return torch.from_numpy(np.ascontiguousarray(self.arr[idx]))

    def dim(self) -> int:
        return len(self.shape)


# ------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------
class _Steps(nn.Module):
    """A run's trainable modules as one module whose forward is one step's loss: what
    ``DistributedDataParallel`` wraps (once, so co-trained teachers, gate and student share one
    gradient all-reduce)."""

    def __init__(self, modules: Dict[str, nn.Module], step: Callable) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.step = step

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.step(ids, labels, index)


class _Optimizer:
    """Adam for dense parameters, ``SparseAdam`` for sparse-gradient embeddings (modules with
    ``sparse=True``); tables with a ``fused_optimizer`` update themselves inside backward, so they
    are left out, and only their ``lr`` follows the plateau schedule.

    With dense parameters only, the state dict is Adam's own (checkpoints keep their format).
    """

    def __init__(self, modules: Dict[str, nn.Module], params: List[nn.Parameter], lr: float) -> None:
        sparse, fused = set(), []
        for mod in modules.values():
            for m in mod.modules():
                w = getattr(m, "weight", None)
                if not isinstance(w, nn.Parameter):
                    continue
                if getattr(m, "fused_optimizer", None):
                    fused.append(m)
                elif getattr(m, "sparse", False) is True:
                    sparse.add(id(w))
        skip = {id(m.weight) for m in fused}
        dense = [p for p in params if id(p) not in sparse and id(p) not in skip]
        self.fused = fused
        self.dense = torch.optim.Adam(dense, lr=lr) if dense else None
        sp = [p for p in params if id(p) in sparse]
        self.sparse = torch.optim.SparseAdam(sp, lr=lr) if sp else None
        self.opts = [o for o in (self.dense, self.sparse) if o is not None]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def scale_lr(self, factor: float) -> None:
        for o in self.opts:
            for g in o.param_groups:
                g["lr"] *= factor
        for m in self.fused:
            m.lr *= factor

    def state_dict(self) -> dict:
        if self.sparse is None and not self.fused and self.dense is not None:
            return self.dense.state_dict()
        return {"dense": self.dense.state_dict() if self.dense else None,
                "sparse": self.sparse.state_dict() if self.sparse else None,
                "fused_lr": [m.lr for m in self.fused]}

    def load_state_dict(self, st: dict) -> None:
        if self.sparse is None and not self.fused and self.dense is not None:
            self.dense.load_state_dict(st)
            return
        for o, k in ((self.dense, "dense"), (self.sparse, "sparse")):
            if o is not None:
                o.load_state_dict(st[k])
        for m, lr in zip(self.fused, st["fused_lr"]):
            m.lr = lr


class _Loop:
    """One optimisation run with early stopping and atomic per-epoch checkpoints.

    ``step(ids, labels, index) -> loss`` does one batch's forward; ``monitor() -> float`` scores
    an epoch (under torch.distributed it is called on every rank and may use collectives).
    ``modules`` are what the checkpoint and the best-epoch snapshot hold.
    """

    def __init__(self, modules: Dict[str, nn.Module], params: List[nn.Parameter], cfg: TrainConfig,
                 monitor_name: str, checkpoint: Optional[Path], resume: bool, desc: str,
                 stop_after_epoch: Optional[int] = None) -> None:
        self.modules = modules
        self.cfg = cfg
        self.opt = _Optimizer(modules, params, cfg.lr)
        self.stopper = EarlyStopper(monitor_name, cfg.patience)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.checkpoint = checkpoint
        self.resume = resume
        self.desc = desc
        self.history: List[dict] = []
        self.epoch = 0
        self.stop_after_epoch = stop_after_epoch  # testing hook: simulate a crash

    def _state(self) -> dict:
        return {
            "epoch": self.epoch,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.opt.state_dict(),
            "stopper": self.stopper.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "history": self.history,
        }

    def _restore(self, st: dict) -> None:
        self.epoch = st["epoch"]
        for k, m in self.modules.items():
            m.load_state_dict(st["modules"][k])
        self.opt.load_state_dict(st["optimizer"])
        self.stopper.load_state_dict(st["stopper"])
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        np.random.set_state(st["numpy_rng"])
        random.setstate(st["python_rng"])
        self.history = st["history"]

    def run(self, ids: torch.Tensor, labels: torch.Tensor,
            step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
            monitor: Callable[[], float]) -> dict:
        from tqdm.auto import tqdm

        world, rank = _dist.get_world_size(), _dist.get_rank()
        if self.resume and self.checkpoint is not None and self.checkpoint.exists():
            self._restore(torch.load(self.checkpoint, weights_only=False))
        n = ids.shape[0]
        bs = self.cfg.batch_size
        done = self.stopper.should_stop
        if world > 1 and not done and self.epoch < self.cfg.max_epochs:
            from torch.nn.parallel import DistributedDataParallel

            if self.opt.fused:
                raise ValueError(f"{type(self.opt.fused[0]).__name__} with fused_optimizer updates its rows inside backward, outside "
                                 "DDP's gradient all-reduce, so ranks would drift apart; train it with the "
                                 "default dense gradient under torch.distributed")
            bs = max(1, bs // world)
            step = DistributedDataParallel(_Steps(self.modules, step))
        # one context object for every step (fp32 runs need none)
        amp = (torch.autocast(ids.device.type, dtype=torch.bfloat16) if self.cfg.precision == "bf16"
               else contextlib.nullcontext())
        # under DDP, BatchNorm layers normalise with the statistics of the global batch
        with _dist.sync_batch_norm(self.modules.values()):
            while not done and self.epoch < self.cfg.max_epochs:
                t0 = time.perf_counter()
                for m in self.modules.values():
                    m.train()
                perm = torch.randperm(n, generator=self.gen)
                if world > 1:
                    # same permutation on every rank (self.gen), dealt like DistributedSampler; dropout
                    # masks differ per rank and are reproducible on resume
                    torch.manual_seed(_dist.rank_seed(self.cfg.seed, self.epoch))
                    perm = _dist.shard_permutation(perm)
                rows = perm.shape[0]
                ids_e, lab_e = ids[perm], labels[perm]
                total, seen = torch.zeros((), dtype=torch.float64), 0
                bar = tqdm(total=rows, desc=f"{self.desc} epoch {self.epoch + 1}", unit="sample",
                           disable=not self.cfg.show_progress or rank != 0, leave=False)
                # a final batch of one sample would break BatchNorm; fold it into the previous batch
                stops = list(range(bs, rows, bs))
                if stops and rows - stops[-1] < 2:
                    stops.pop()
                bounds = list(zip([0] + stops, stops + [rows]))
                for k, (a, b) in enumerate(bounds):
                    with amp:
                        loss = step(ids_e[a:b], lab_e[a:b], perm[a:b])
                    self.opt.zero_grad()
                    loss.backward()
                    self.opt.step()
                    total += loss.detach() * (b - a)
                    seen += b - a
                    if bar.disable is False and (k % 10 == 0 or b == rows):
                        bar.set_postfix(loss=f"{float(total) / seen:.4f}")
                    bar.update(b - a)
                bar.close()
                if world > 1:
                    _dist.broadcast_buffers(self.modules.values())
                    both = _dist.all_reduce_sum(torch.stack([total, torch.tensor(float(seen), dtype=torch.float64)]))
                    total, seen = both[0], int(both[1])
                train_time = time.perf_counter() - t0
                for m in self.modules.values():
                    m.eval()
                value = monitor()
                if world > 1:
                    value = _dist.broadcast_float(value)
                improved = self.stopper.step(value, self.epoch, self.modules)
                if not improved and self.cfg.reduce_lr_on_plateau:
                    self.opt.scale_lr(0.1)
                self.history.append({"epoch": self.epoch + 1, "train_loss": float(total) / max(seen, 1),
                                     "monitor": value, "train_seconds": train_time,
                                     "samples_per_s": n / train_time})
                self.epoch += 1
                done = self.stopper.should_stop
                if self.checkpoint is not None and rank == 0:
                    atomic_save(self._state(), self.checkpoint)
                if self.stop_after_epoch is not None and self.epoch >= self.stop_after_epoch:
                    raise KeyboardInterrupt(f"stopped after epoch {self.epoch} (stop_after_epoch)")
        if self.stopper.best_state is not None:
            for k, m in self.modules.items():
                m.load_state_dict(self.stopper.best_state[k])
        for m in self.modules.values():
            m.eval()
        return {"epochs": self.epoch, "best_epoch": self.stopper.best_epoch + 1,
                "best_monitor": self.stopper.best, "history": self.history}


def _label_monitor(model: nn.Module, data: CTRData, metric: str, batch_size: int) -> Callable[[], float]:
    def monitor() -> float:
        if _dist.get_world_size() == 1:
            return evaluate(model, data, batch_size)[metric]
        # each rank scores its block; the metric is computed on all of them, in row order
        a, b = _dist.shard_bounds(len(data))
        z = _dist.gather_rows(predict(model, torch.from_numpy(data.ids[a:b]), batch_size), len(data))
        return scores(data.labels, z)[metric]
    return monitor


def _plus_regularization(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` plus the model's own penalty, for models that define ``regularization_loss()``."""
    reg = getattr(model, "regularization_loss", None)
    return loss + reg() if reg is not None else loss


def _freeze(models) -> None:
    for m in models:
        m.eval()
        m.requires_grad_(False)


def _bce_step(model: nn.Module) -> Callable:
    bce = nn.BCEWithLogitsLoss()

    def step(ids, y, _index):
        return _plus_regularization(model, bce(model(ids), y))
    return step


def train_model(model: nn.Module, train: CTRData, valid: CTRData, cfg: TrainConfig, *,
                checkpoint: Optional[Union[str, Path]] = None, resume: bool = False,
                desc: str = "model", stop_after_epoch: Optional[int] = None) -> dict:
    """Train ``model`` on labels (binary cross-entropy) with early stopping on ``valid``.

    Returns a summary dict (epochs run, best epoch, per-epoch history). The best epoch's weights
    are loaded into ``model`` at the end.
    """
    if cfg.early_stop == "kd":
        raise ValueError("early_stop='kd' needs teachers; use Distiller (plain models stop on auc or logloss)")
    seed_everything(cfg.seed)
    train, monitor_data = cfg.split_validation(train, valid)
    ids, labels = _as_tensors(train)
    loop = _Loop({"model": model}, list(model.parameters()), cfg, cfg.early_stop,
                 Path(checkpoint) if checkpoint else None, resume, desc, stop_after_epoch)
    return loop.run(ids, labels, _bce_step(model),
                    _label_monitor(model, monitor_data, cfg.early_stop, cfg.eval_batch_size))


# ------------------------------------------------------------------------------------------------
# Distillation
# ------------------------------------------------------------------------------------------------
class Distiller:
    """Distil an ensemble of CTR teachers into a student, by pre-training or co-training.

    ``mode="pretrain"``: the teachers are trained first (unless ``teachers_trained=True``), frozen,
    and their outputs cached once in a :class:`TeacherCache`; student epochs read the cache by
    sample index and never run a teacher. ``mode="cotrain"``: teachers, gate and student train
    together; each teacher learns from its own label loss, and the distillation gradient flows
    from teachers to student only (teacher logits enter the loss detached).

    Args:
        teachers: the M teacher models.
        student: the student model (one logit per sample; ``return_hidden`` for hints).
        mode: "pretrain" | "cotrain".
        gate: "logit" | "hidden" | "mean" (see :class:`~fastkd.GatedDistillLoss`).
        ensemble: "logit" | "prob".
        temperature, hard_weight, kd_weight, gate_loss_weight: loss settings.
        hint_weight: weight of the hint loss ``‖W_i v_Ti − v_S‖²`` averaged over teachers (0: off).
        hint_normalize: compare L2-normalised hints (default). With the plain formula and W_i
            trained alongside, ``W_i = 0, v_S = 0`` is a minimum, and on Frappe the student
            collapsed to AUC 0.50 (see :func:`fastkd.functional.hint_loss`).
        config: optimisation and early stopping (:class:`TrainConfig`).
        teacher_config: settings for training the teachers (default: ``config.for_teachers()``).

    Example::

        >>> from fastkd import Distiller, TrainConfig
        >>> from fastkd.data import make_synthetic
        >>> from fastkd.models import build_model
        >>> train, valid, test = make_synthetic(6000, seed=0).split((0.8, 0.1, 0.1))
        >>> fs = train.field_sizes
        >>> cfg = TrainConfig(max_epochs=2, batch_size=512)
        >>> teachers = [build_model(n, fs, hidden_units=(32,)) for n in ("deepfm", "dcn")]
        >>> kd = Distiller(teachers, build_model("dnn", fs, hidden_units=(16,)), config=cfg)
        >>> summary = kd.fit(train, valid)
        >>> round(kd.evaluate(test)["auc"], 1) > 0.5
        True
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        student: nn.Module,
        *,
        mode: str = "pretrain",
        gate: str = "logit",
        ensemble: str = "logit",
        temperature: float = 1.0,
        hard_weight: float = 1.0,
        kd_weight: float = 1.0,
        gate_loss_weight: float = 1.0,
        hint_weight: float = 0.0,
        hint_normalize: bool = True,
        config: Optional[TrainConfig] = None,
        teacher_config: Optional[TrainConfig] = None,
        teachers_trained: bool = False,
        cache_dir: Optional[Union[str, Path]] = None,
    ) -> None:
        if mode not in ("pretrain", "cotrain"):
            raise ValueError(f"mode must be 'pretrain' or 'cotrain', got {mode!r}")
        if len(teachers) == 0:
            raise ValueError("at least one teacher is needed")
        self.teachers = nn.ModuleList(teachers)
        self.student = student
        self.mode = mode
        self.config = config or TrainConfig()
        self.teacher_config = teacher_config or self.config.for_teachers()
        if mode == "cotrain" and self.config.early_stop == "kd":
            raise ValueError("co-training stops on the student's validation AUC/logloss: the teachers "
                             "(and so the distillation targets) move during training")
        self.teachers_trained = teachers_trained
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.hint_weight = float(hint_weight)
        needs_hidden = gate == "hidden" or self.hint_weight > 0
        self.needs_hidden = needs_hidden
        # teachers' hidden vectors are zero-padded to the widest one (see TeacherCache.build)
        self.hidden_dim = max(int(getattr(t, "hidden_dim", 0)) for t in teachers)
        self.loss = GatedDistillLoss(
            len(teachers), temperature=temperature, hard_weight=hard_weight, kd_weight=kd_weight,
            gate=gate, hidden_dim=self.hidden_dim if gate == "hidden" else None, ensemble=ensemble,
            gate_loss_weight=gate_loss_weight,
        )
        self.hints = None
        if self.hint_weight > 0:
            sd = int(getattr(student, "hidden_dim", 0))
            self.hints = nn.ModuleList(HintLoss(self.hidden_dim, sd, normalize=hint_normalize) for _ in teachers)
        self.cache: Optional[TeacherCache] = None
        self.summary: Dict[str, object] = {}

    # -- pieces -------------------------------------------------------------------------------
    def _student_out(self, ids):
        if self.hints is not None:
            return self.student(ids, return_hidden=True)
        return self.student(ids), None

    @torch.no_grad()
    def _kd_term(self, z_s: torch.Tensor, t_logits: torch.Tensor, t_hidden) -> torch.Tensor:
        """Summed distillation term ``CE(target, z_S/T)`` alone: what ``early_stop="kd"`` monitors."""
        from .reference import gated_distill_loss_ref

        crit = self.loss
        loss, _ = gated_distill_loss_ref(
            z_s, t_logits, None, t_hidden, gate=crit.gate_arg,
            gate_weight=None if crit.weight is None else crit.weight.detach(),
            gate_bias=None if crit.bias is None else crit.bias.detach(),
            temperature=crit.temperature, hard_weight=0.0, kd_weight=1.0, ensemble=crit.ensemble,
            gate_loss_weight=0.0, reduction="sum")
        return loss

    def _student_loss(self, ids, y, t_logits, t_hidden) -> torch.Tensor:
        z_s, h_s = self._student_out(ids)
        loss = self.loss(z_s, t_logits, y, t_hidden)
        if self.hints is not None:
            hint = sum(h(h_s, t_hidden[:, i]) for i, h in enumerate(self.hints)) / len(self.hints)
            loss = loss + self.hint_weight * hint
        return _plus_regularization(self.student, loss)

    def _student_params(self) -> List[nn.Parameter]:
        params = list(self.student.parameters()) + list(self.loss.parameters())
        if self.hints is not None:
            params += list(self.hints.parameters())
        return params

    def _student_modules(self) -> Dict[str, nn.Module]:
        mods = {"student": self.student, "loss": self.loss}
        if self.hints is not None:
            mods["hints"] = self.hints
        return mods

    # -- fit ----------------------------------------------------------------------------------
    def fit(self, train: CTRData, valid: CTRData, *, checkpoint_dir: Optional[Union[str, Path]] = None,
            resume: bool = False, stop_after_epoch: Optional[int] = None) -> dict:
        """Train (teachers, then) the student. Returns a summary with per-phase histories."""
        ckpt = Path(checkpoint_dir) if checkpoint_dir else None
        if self.mode == "cotrain":
            return self._fit_cotrain(train, valid, ckpt, resume, stop_after_epoch)
        cfg = self.config
        t0 = time.perf_counter()
        if not self.teachers_trained:
            self.summary["teachers"] = []
            for i, t in enumerate(self.teachers):
                tc = dataclasses.replace(self.teacher_config, seed=self.teacher_config.seed + 1000 * (i + 1))
                s = train_model(t, train, valid, tc, desc=f"teacher {i}",
                                checkpoint=ckpt / f"teacher{i}.pt" if ckpt else None, resume=resume)
                self.summary["teachers"].append(s)
        _freeze(self.teachers)
        self.summary["teacher_seconds"] = time.perf_counter() - t0

        student_train, monitor_data = cfg.split_validation(train, valid)
        t1 = time.perf_counter()
        self.cache = TeacherCache.build(list(self.teachers), student_train, hidden=self.needs_hidden,
                                        batch_size=cfg.eval_batch_size,
                                        path=self.cache_dir, progress=cfg.show_progress)
        self.summary["cache_seconds"] = time.perf_counter() - t1
        cache = self.cache

        def step(ids, y, index):
            t_logits, t_hidden = cache.gather(index)
            return self._student_loss(ids, y, t_logits, t_hidden)

        if cfg.early_stop == "kd":
            # under torch.distributed each rank sums the term over its block of the monitor rows
            mon_rows = monitor_data
            if _dist.get_world_size() > 1:
                mon_rows = monitor_data.subset(slice(*_dist.shard_bounds(len(monitor_data))))
            mon_cache = TeacherCache.build(list(self.teachers), mon_rows, hidden=self.needs_hidden,
                                           batch_size=cfg.eval_batch_size, shard=False)

            def monitor() -> float:
                z = predict(self.student, mon_rows, cfg.eval_batch_size)
                kd = self._kd_term(z, mon_cache.logits, mon_cache.hidden)
                return float(_dist.all_reduce_sum(kd.double())) / len(monitor_data)
        else:
            monitor = _label_monitor(self.student, monitor_data, cfg.early_stop, cfg.eval_batch_size)

        seed_everything(cfg.seed)
        ids, labels = _as_tensors(student_train)
        loop = _Loop(self._student_modules(), self._student_params(), cfg, cfg.early_stop,
                     ckpt / "student.pt" if ckpt else None, resume, "student", stop_after_epoch)
        self.summary["student"] = loop.run(ids, labels, step, monitor)
        return self.summary

    def _fit_cotrain(self, train, valid, ckpt, resume, stop_after_epoch) -> dict:
        cfg = self.config
        bce = nn.BCEWithLogitsLoss()
        teachers = self.teachers

        def step(ids, y, _index):
            outs = [t(ids, return_hidden=self.needs_hidden) for t in teachers]
            if self.needs_hidden:
                t_logits = torch.stack([o[0] for o in outs], 1)
                d = self.hidden_dim
                t_hidden = torch.stack([nn.functional.pad(o[1], (0, d - o[1].shape[1])) for o in outs], 1)
            else:
                t_logits, t_hidden = torch.stack(outs, 1), None
            teacher_loss = sum(_plus_regularization(t, bce(t_logits[:, i], y)) for i, t in enumerate(teachers))
            # detached: the distillation gradient flows teacher -> student only
            student_loss = self._student_loss(ids, y, t_logits.detach(),
                                              None if t_hidden is None else t_hidden.detach())
            return teacher_loss + student_loss

        seed_everything(cfg.seed)
        train, monitor_data = cfg.split_validation(train, valid)
        ids, labels = _as_tensors(train)
        mods = {**self._student_modules(), "teachers": teachers}
        params = self._student_params() + list(teachers.parameters())
        loop = _Loop(mods, params, cfg, cfg.early_stop, ckpt / "cotrain.pt" if ckpt else None, resume,
                     "co-train", stop_after_epoch)
        self.summary["student"] = loop.run(ids, labels, step,
                                           _label_monitor(self.student, monitor_data, cfg.early_stop,
                                                          cfg.eval_batch_size))
        _freeze(teachers)
        return self.summary

    # -- use ----------------------------------------------------------------------------------
    def predict(self, data: CTRData) -> torch.Tensor:
        """Student logits [N]."""
        return predict(self.student, data, self.config.eval_batch_size)

    def evaluate(self, data: CTRData) -> Dict[str, float]:
        """Student test metrics {"auc", "logloss"}."""
        return evaluate(self.student, data, self.config.eval_batch_size)

    @torch.no_grad()
    def gate_weights(self, data: CTRData) -> torch.Tensor:
        """Per-sample teacher weights α [N, M] of the trained gate on ``data``."""
        from .reference import gate_weights_ref

        cache = TeacherCache.build(list(self.teachers), data, hidden=self.needs_hidden,
                                   batch_size=self.config.eval_batch_size, shard=False)
        crit = self.loss
        return gate_weights_ref(cache.logits, crit.gate_arg, crit.weight, crit.bias, cache.hidden)

"""The epoch loop for plain models and students (:func:`train_model`, ``_Loop``).

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
  step, so the rows of one step over all ranks are the rows of one single-process batch; with
  ``TrainConfig.row_blocks=W`` rank ``r`` permutes its own contiguous block of rows instead
  (:func:`fastkd.distributed.block_order`) and reads no other rank's rows;
* stopping quantities are computed on predictions gathered from every rank (AUC, logloss) or
  summed over ranks (distillation loss), and rank 0's value decides for everyone;
* ``BatchNorm1d`` layers normalise with the statistics of the global batch
  (:func:`fastkd.distributed.sync_batch_norm`);
* only rank 0 writes checkpoints; :class:`~fastkd.train.teacher_cache.TeacherCache` is built in parallel.

Checkpoints (``checkpoint=``, one file rewritten atomically after every epoch) carry a manifest
(:mod:`fastkd.train.manifest`): the fingerprint of the training rows and of the monitor rows, the
:class:`TrainConfig` fields that change the numbers, the modules' parameter shapes, a checksum, and
whatever the caller adds (the Distiller: its loss settings and the teachers' weights). ``resume=True``
restores a checkpoint only when all of it matches this run, so a resumed run equals an uninterrupted
one; otherwise it raises :class:`~fastkd.train.manifest.ArtifactMismatchError` (the file, the
field, both values) or, for an unreadable file, :class:`~fastkd.train.manifest.CorruptArtifactError`.

With no process group (or a group of one) nothing of this runs and results are unchanged.
"""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from .. import distributed as _dist
from ..data import CTRData
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, seed_everything
from .early_stopping import EarlyStopper
from .evaluation import _as_tensors, _label_monitor
from .manifest import data_fingerprint, module_shapes, resume_config

__all__ = ["train_model"]


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
        self.dense_params = dense  # what clip() scales (clip_grad_norm_ skips those without a gradient)
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

    def clip(self, max_norm: float) -> None:
        """Scale the dense parameters' gradients to a total 2-norm of at most ``max_norm``
        (FuxiCTR clips at 10); sparse-gradient and fused tables are left as they are. Under DDP
        the gradients are already all-reduced, so every rank scales alike. No host sync."""
        if self.dense_params:
            nn.utils.clip_grad_norm_(self.dense_params, max_norm, foreach=True)

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
    ``modules`` are what the checkpoint and the best-epoch snapshot hold. ``manifest()`` (called
    only with a ``checkpoint``) returns the run's fields beyond the training rows, config and
    shapes that a resumed checkpoint must match (e.g. the monitor rows' fingerprint).
    """

    def __init__(self, modules: Dict[str, nn.Module], params: List[nn.Parameter], cfg: TrainConfig,
                 monitor_name: str, checkpoint: Optional[Path], resume: bool, desc: str,
                 stop_after_epoch: Optional[int] = None,
                 manifest: Optional[Callable[[], dict]] = None) -> None:
        self.modules = modules
        self.cfg = cfg
        self.opt = _Optimizer(modules, params, cfg.lr)
        self.stopper = EarlyStopper(monitor_name, cfg.patience, cfg.monitor_window if cfg.average_window else 1)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.checkpoint = checkpoint
        self.resume = resume
        self.desc = desc
        self.history: List[dict] = []
        self.epoch = 0
        self.stop_after_epoch = stop_after_epoch  # testing hook: simulate a crash
        self.extra_manifest = manifest
        self.monitor_name = monitor_name

    def _manifest(self, ids: torch.Tensor, labels: torch.Tensor) -> dict:
        """What this run's checkpoint must match to be resumed (see :mod:`fastkd.train.manifest`)."""
        return {"data": data_fingerprint(ids, labels), "config": resume_config(self.cfg),
                "monitor": self.monitor_name, "shapes": module_shapes(self.modules),
                **(self.extra_manifest() if self.extra_manifest is not None else {})}

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
        manifest = self._manifest(ids, labels) if self.checkpoint is not None else None
        if self.resume and self.checkpoint is not None and self.checkpoint.exists():
            self._restore(load_checkpoint(self.checkpoint, manifest))
        n = ids.shape[0]
        bs = self.cfg.batch_size
        blocks = self.cfg.row_blocks
        if blocks is not None:
            if world > 1 and blocks != world:
                raise ValueError(f"row_blocks={blocks} under a process group of {world} ranks: it must be the "
                                 "world size (each rank reads its own block)")
            bs = max(1, bs // blocks)  # per block; under DDP the same as per rank
        done = self.stopper.should_stop
        if world > 1 and not done and self.epoch < self.cfg.max_epochs:
            from torch.nn.parallel import DistributedDataParallel

            if self.opt.fused:
                raise ValueError(f"{type(self.opt.fused[0]).__name__} with fused_optimizer updates its rows inside backward, outside "
                                 "DDP's gradient all-reduce, so ranks would drift apart; train it with the "
                                 "default dense gradient under torch.distributed")
            if blocks is None:  # with row blocks already per rank
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
                if world > 1:  # dropout masks differ per rank and are reproducible on resume
                    torch.manual_seed(_dist.rank_seed(self.cfg.seed, self.epoch))
                if blocks is None:
                    # int32 halves the permutation's memory (4 bytes a row on large data); randperm draws
                    # the same permutation for either dtype from the same generator state
                    perm = torch.randperm(n, generator=self.gen, dtype=torch.int32 if n < 2**31 else torch.int64)
                    if world > 1:  # same permutation on every rank (self.gen), dealt like DistributedSampler
                        perm = _dist.shard_permutation(perm)
                    perm = perm[None]
                else:  # [W, L] in one process, [1, L] (this rank's block) under DDP
                    perm = _dist.block_order(n, blocks, self.cfg.seed, self.epoch, None if world == 1 else rank)
                rows = perm.shape[1]
                total, seen = torch.zeros((), dtype=torch.float64), 0
                bar = tqdm(total=rows * perm.shape[0], desc=f"{self.desc} epoch {self.epoch + 1}", unit="sample",
                           disable=not self.cfg.show_progress or rank != 0, leave=False)
                # a final batch of one sample would break BatchNorm; fold it into the previous batch
                stops = list(range(bs, rows, bs))
                if stops and rows - stops[-1] < 2:
                    stops.pop()
                bounds = list(zip([0] + stops, stops + [rows]))[:self.cfg.steps_per_epoch]
                for k, (a, b) in enumerate(bounds):
                    # gathered batch by batch: no permuted copy of the whole training set per epoch
                    # (ids may be memory-mapped rows: fastkd.data.rows.TensorRows)
                    index = perm[:, a:b].reshape(-1).long()
                    with amp:
                        loss = step(ids[index], labels[index], index)
                    self.opt.zero_grad()
                    loss.backward()
                    if self.cfg.grad_clip_norm is not None:
                        self.opt.clip(self.cfg.grad_clip_norm)
                    self.opt.step()
                    total += loss.detach() * index.shape[0]
                    seen += index.shape[0]
                    if bar.disable is False and (k % 10 == 0 or b == rows):
                        bar.set_postfix(loss=f"{float(total) / seen:.4f}")
                    bar.update(index.shape[0])
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
                raw = [h["monitor"] for h in self.history[-(self.cfg.monitor_window - 1):]] if \
                    self.cfg.monitor_window > 1 else []
                smoothed = float(np.mean(raw + [value]))
                improved = self.stopper.step(smoothed, self.epoch, self.modules)
                if not improved and self.cfg.reduce_lr_on_plateau:
                    self.opt.scale_lr(0.1)
                self.history.append({"epoch": self.epoch + 1, "train_loss": float(total) / max(seen, 1),
                                     "monitor": value, "smoothed_monitor": smoothed, "train_seconds": train_time,
                                     "samples_per_s": (n if self.cfg.steps_per_epoch is None else seen) / train_time})
                self.epoch += 1
                done = self.stopper.should_stop
                if self.checkpoint is not None and rank == 0:
                    save_checkpoint(self._state(), self.checkpoint, manifest)
                if self.stop_after_epoch is not None and self.epoch >= self.stop_after_epoch:
                    raise KeyboardInterrupt(f"stopped after epoch {self.epoch} (stop_after_epoch)")
        if self.stopper.best_state is not None:
            for k, m in self.modules.items():
                m.load_state_dict(self.stopper.best_state[k])
        for m in self.modules.values():
            m.eval()
        return {"epochs": self.epoch, "best_epoch": self.stopper.best_epoch + 1,
                "best_monitor": self.stopper.best, "history": self.history}


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

    ``checkpoint``: a file rewritten after every epoch; with ``resume=True`` an existing one is
    continued, after checking that it was written by this run (same training and validation rows,
    settings and model shapes; see :mod:`fastkd.train.manifest`), else
    :class:`~fastkd.train.manifest.ArtifactMismatchError` or
    :class:`~fastkd.train.manifest.CorruptArtifactError` names the file and the problem.
    """
    if cfg.early_stop == "kd":
        raise ValueError("early_stop='kd' needs teachers; use Distiller (plain models stop on auc or logloss)")
    seed_everything(cfg.seed)
    train, monitor_data = cfg.split_validation(train, valid)
    ids, labels = _as_tensors(train)
    loop = _Loop({"model": model}, list(model.parameters()), cfg, cfg.early_stop,
                 Path(checkpoint) if checkpoint else None, resume, desc, stop_after_epoch,
                 manifest=lambda: {"monitor_data": data_fingerprint(monitor_data.ids, monitor_data.labels)})
    return loop.run(ids, labels, _bce_step(model),
                    _label_monitor(model, monitor_data, cfg.early_stop, cfg.eval_batch_size))

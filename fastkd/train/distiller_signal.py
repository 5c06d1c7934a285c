"""The Distiller's teacher side: teachers, transfer rows, teacher cache, gate and ensemble targets.

:class:`DistillerSignal` is a mixin of :class:`~fastkd.train.distiller.Distiller` (which sets every
attribute it reads in ``__init__``): steps 1-3 of the pre-train mode (:meth:`~DistillerSignal.prepare`),
one prepared signal shared by several students (``fit(signal_from=...)``), the stopping monitor on
the distillation term, and the ensemble as the student sees it (:meth:`~DistillerSignal.gate_weights`,
:meth:`~DistillerSignal.ensemble_logits`). The module functions that do the work (cache, honest gate
rows, targets) are in :mod:`fastkd.train.teacher_signal`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import distributed as _dist
from .. import functional as FK
from ..augment import augmented_rows, swap_augment
from ..data import CTRData
from ..gates import GateRows, ensemble_logits, gate_alpha
from .embed_transfer import embedding_source
from .evaluation import predict
from .loop import _freeze
from .teacher_cache import TeacherCache
from .teacher_signal import Prepared as _Prepared
from .teacher_signal import check_shareable, ensemble_targets, rank_file, transfer_cache
from .teachers import TeacherSet, fingerprint, train_teachers

__all__ = ["DistillerSignal"]

# seed offset of the augmentation draws, so they do not repeat the run's other streams
_AUGMENT_SEED = 7919


class DistillerSignal:
    """Teachers and the teacher signal of a :class:`~fastkd.train.distiller.Distiller` (a mixin)."""

    # -- teachers ---------------------------------------------------------------------------
    def _teachers(self, train: CTRData, valid: CTRData, student_train: CTRData, monitor: CTRData, ckpt,
                  resume) -> TeacherSet:
        if self.teacher_set is not None:
            ts = self.teacher_set
            if ts.folds > 1 and not ts.covers(student_train):
                raise ValueError("the TeacherSet was cross-fitted on other rows than this run's student training "
                                 "rows (same train/valid split and merge_validation setting needed)")
            if ts.saw_validation and ts.fitted is not None and fingerprint(student_train) != ts.fitted:
                raise ValueError("the TeacherSet was trained on other rows than this run's student training rows "
                                 "(same train/valid split and monitor_fraction needed): its stacked gate would "
                                 "fit on rows its teachers saw")
            if self.teacher_rows == "merged" and not ts.saw_validation:  # said so by the caller
                ts = dataclasses.replace(ts, saw_validation=True)
            return ts
        merged = self.teacher_rows == "merged" and self.config.merge_validation
        if self.teachers_trained:
            _freeze(self.teachers)
            return TeacherSet(list(self.teachers), saw_validation=merged)
        tc = self.teacher_config
        if merged and self.teacher_folds == 1:
            # the student's rows, stopped on the monitor rows: those stay unseen by every teacher
            ts = train_teachers(list(self.teachers), student_train, monitor, tc, seed=tc.seed, checkpoint_dir=ckpt,
                                resume=resume)
            ts.saw_validation, ts.fitted = True, fingerprint(student_train)
        elif self.teacher_folds > 1:
            # cross-fitted on exactly the rows the student trains on; the monitor rows stay unseen
            ts = train_teachers(list(self.teachers), student_train, valid, tc, folds=self.teacher_folds,
                                seed=tc.seed, checkpoint_dir=ckpt, resume=resume)
        else:
            ts = train_teachers(list(self.teachers), train, valid, tc, seed=tc.seed, checkpoint_dir=ckpt,
                                resume=resume)
        self.teacher_set = ts
        return ts

    # -- the signal: transfer rows, cache, gate, targets ------------------------------------
    def prepare(self, train: CTRData, valid: CTRData, *, checkpoint_dir: Optional[Union[str, Path]] = None,
                resume: bool = False) -> "DistillerSignal":
        """Pre-train mode: everything before the student's epochs (teachers, transfer rows, teacher
        cache, gate and ensemble targets), kept for :meth:`fit` on the same ``train``/``valid``
        and for other Distillers' ``fit(signal_from=self)`` until :meth:`release` (a plain
        ``fit`` drops the rows it prepared when done). Returns ``self``.

        Example::

            >>> from fastkd import Distiller, TrainConfig
            >>> from fastkd.data import make_synthetic
            >>> from fastkd.models import build_model
            >>> train, valid, test = make_synthetic(4000, seed=0).split((0.8, 0.1, 0.1))
            >>> fs, cfg = train.field_sizes, TrainConfig(max_epochs=1, batch_size=512)
            >>> teachers = [build_model(n, fs, hidden_units=(16,)) for n in ("deepfm", "dcn")]
            >>> first = Distiller(teachers, build_model("dnn", fs, hidden_units=(16,)), config=cfg)
            >>> first = first.prepare(train, valid)   # teachers trained, cache and targets built once
            >>> second = Distiller(first.teacher_set, build_model("dnn", fs, hidden_units=(32,)), config=cfg)
            >>> for kd in (first, second):   # two students, one teacher signal
            ...     _ = kd.fit(train, valid, signal_from=first)
            >>> second.summary["signal_shared"]
            True
        """
        if self.mode != "pretrain":
            raise ValueError("prepare() is the pre-train mode's first half: co-training has no fixed teacher signal")
        self._prepare(train, valid, Path(checkpoint_dir) if checkpoint_dir else None, resume)
        self._keep_prepared = True
        return self

    def _prepare(self, train: CTRData, valid: CTRData, ckpt: Optional[Path], resume: bool) -> None:
        cfg = self.config
        student_train, monitor_data = cfg.split_validation(train, valid)
        t0 = time.perf_counter()
        ts = self._teachers(train, valid, student_train, monitor_data, ckpt, resume)
        self.teachers = nn.ModuleList(ts.models)
        if not self.teachers_trained:
            self.summary["teachers"] = [s for per in ts.summaries for s in per]
        self.summary["teacher_seconds"] = time.perf_counter() - t0
        self.summary["teacher_folds"] = ts.folds

        t1 = time.perf_counter()
        n_aug = augmented_rows(len(student_train), self.augment)
        aug_ids = swap_augment(student_train.ids, self.augment, self.augment_swap, seed=cfg.seed + _AUGMENT_SEED,
                               out=None if self.cache_dir is None or n_aug == 0 else
                               rank_file(self.cache_dir, "augmented_ids", np.int64, (n_aug, student_train.ids.shape[1])))
        self.cache = cache = transfer_cache(ts, student_train, aug_ids, hidden=self.needs_hidden,
                                            batch_size=cfg.eval_batch_size, path=self.cache_dir,
                                            progress=cfg.show_progress)
        # once per signal: students sharing it (dropout candidates) start from the same teacher
        embed_src = self._embedding_source(monitor_data) if self.student_embed_init else None
        self._prepared = _Prepared(train, valid, student_train, monitor_data, aug_ids, embed_src)
        self.targets = None
        if not self.joint_gate:  # a joint gate trains with the student: no target per row beforehand
            self.targets, self.stacked_gate, gate_summary = ensemble_targets(
                ts, self._prepared, cache, gate=self.gate, hidden_dim=self.hidden_dim, ensemble=self.ensemble,
                temperature=self.temperature, config=cfg, cache_dir=self.cache_dir)
            if gate_summary is not None:
                self.summary["gate"] = gate_summary
        self.summary["cache_seconds"] = time.perf_counter() - t1
        self.summary["augmented_rows"] = int(len(aug_ids))

    def _embedding_source(self, monitor_data: CTRData) -> int:
        """The teacher of the best monitor AUC whose embedding fits the student's (``student_embed_init``)."""
        bs = self.config.eval_batch_size
        logits = torch.stack([predict(t, monitor_data, bs) for t in self.teachers], 1)
        return embedding_source(self.student, list(self.teachers), logits, monitor_data.labels)

    def release(self) -> None:
        """Drop the transfer cache, the targets and the prepared rows (large at scale); the
        teachers, the gate and the student stay, so prediction still works."""
        self.cache = self.targets = self._prepared = None
        self._keep_prepared = False

    def _adopt(self, other: "DistillerSignal", train: CTRData, valid: CTRData) -> None:
        """Take ``other``'s prepared signal, after checking it is the one this fit would build."""
        if other is self:
            return
        if not isinstance(other, DistillerSignal):
            raise TypeError(f"signal_from must be a Distiller, got {type(other).__name__}")
        p = check_shareable(self, other, train, valid)
        self.teacher_set = other.teacher_set
        self.teachers = other.teachers
        self.stacked_gate = other.stacked_gate
        self.cache, self.targets, self._prepared = other.cache, other.targets, p
        self.summary.update({k: other.summary[k] for k in ("teacher_folds", "cache_seconds", "augmented_rows",
                                                           "gate") if k in other.summary})
        self.summary["teacher_seconds"] = 0.0
        self.summary["signal_shared"] = True

    # -- the ensemble as the student sees it ----------------------------------------------
    def _kd_monitor(self, monitor_data: CTRData):
        cfg = self.config
        # under torch.distributed each rank sums the term over its block of the monitor rows
        mon_rows = monitor_data
        if _dist.get_world_size() > 1:
            mon_rows = monitor_data.subset(slice(*_dist.shard_bounds(len(monitor_data))))
        mon_cache = TeacherCache.build(list(self.teachers), mon_rows, hidden=self.needs_hidden,
                                       batch_size=cfg.eval_batch_size, shard=False)
        if self.joint_gate:
            def term(z):
                return self._kd_term(z, mon_cache.logits, mon_cache.hidden)
        else:
            z_t = self._signal(mon_cache.logits, mon_rows, mon_cache.hidden)

            def term(z):
                return FK.distill_loss(z, z_t, None, self.temperature, 0.0, 1.0, reduction="sum")

        def monitor() -> float:
            z = predict(self.student, mon_rows, cfg.eval_batch_size)
            return float(_dist.all_reduce_sum(term(z).double())) / len(monitor_data)
        return monitor

    @torch.no_grad()
    def _alpha(self, data: CTRData, logits: torch.Tensor, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """Teacher weights α [N, M] on ``data``'s rows, given the teachers' ``logits`` [N, M] there:
        the frozen stacked gate's, plain averaging's, or the joint gate's."""
        if self.stacked_gate is not None:
            return gate_alpha(self.stacked_gate, GateRows(data.ids, logits.numpy(), None,
                                                          None if hidden is None else hidden.numpy()))
        if not self.joint_gate:
            return torch.full_like(logits, 1.0 / logits.shape[1])
        crit = self.loss
        return FK.gate_weights(logits, crit.gate_arg, crit.weight, crit.bias, hidden)

    @torch.no_grad()
    def _signal(self, logits: torch.Tensor, data: CTRData, hidden=None) -> torch.Tensor:
        """Ensemble logit [N] on rows with teacher ``logits`` (and ``hidden``)."""
        logits = torch.as_tensor(logits).float()
        hidden = None if hidden is None else torch.as_tensor(hidden)
        return ensemble_logits(logits, self._alpha(data, logits, hidden), self.ensemble, self.temperature)

    def _teacher_outputs(self, data: CTRData) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The teachers' logits [N, M] (and hidden vectors when the run uses them) on ``data``."""
        cache = TeacherCache.build(list(self.teachers), data, hidden=self.needs_hidden,
                                   batch_size=self.config.eval_batch_size, shard=False)
        return cache.gather(torch.arange(len(cache)))

    @torch.no_grad()
    def gate_weights(self, data: CTRData) -> torch.Tensor:
        """Per-sample teacher weights α [N, M] of the trained gate on ``data``."""
        return self._alpha(data, *self._teacher_outputs(data))

    @torch.no_grad()
    def ensemble_logits(self, data: CTRData) -> torch.Tensor:
        """The teacher ensemble's logit [N] on ``data`` as the student's target defines it (gate and
        ``ensemble`` mixing; rows no teacher trained on)."""
        logits, hidden = self._teacher_outputs(data)
        return self._signal(logits, data, hidden)

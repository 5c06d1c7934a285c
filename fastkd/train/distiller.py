"""The :class:`Distiller`: an ensemble of CTR teachers distilled into one student.

Pre-train mode, in order (each step optional where its setting says so):

1. teachers: trained by :func:`fastkd.train.teachers.train_teachers`, cross-fitted with
   ``teacher_folds=K`` (every student training row then gets its soft label from a fold model
   that never saw it), or passed in trained;
2. transfer rows: the student's training rows, plus ``augment × N`` teacher-labelled rows
   (:func:`fastkd.augment.swap_augment`) that carry no hard label;
3. teacher signal (:mod:`fastkd.train.teacher_signal`): the teachers' logits for every transfer
   row in a :class:`TeacherCache`, and the ensemble's soft label from the gate: plain averaging,
   a gate fitted on honest rows and frozen
   (``gate_fit="stacked"``, :mod:`fastkd.gates`), or the paper's gate trained with the student
   (``gate_fit="joint"``);
4. the student's epochs, which read the cache by row index and never run a teacher.

Steps 1–3 are :meth:`Distiller.prepare`; a second Distiller with the same settings and teachers
skips them with ``fit(signal_from=first)`` (several students, one teacher signal).

Two mixins hold the rest of the class: the teachers and their signal (steps 1–3, the ensemble's
gate weights and logits) in :mod:`fastkd.train.distiller_signal`, the student's per-batch loss
terms in :mod:`fastkd.train.student_terms`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..data.rows import Rows, as_tensor_rows
from ..data import CTRData
from .._validate import check_temperature, check_weight
from ..losses import GatedDistillLoss, HintLoss
from .config import TrainConfig, seed_everything
from .evaluation import _as_tensors, _label_monitor, evaluate, predict
from .loop import _freeze, _Loop, _plus_regularization
from .manifest import data_fingerprint, models_manifest
from .distiller_signal import DistillerSignal
from .embed_transfer import check_embed_init, copy_embedding
from .student_terms import StudentTerms
from .teacher_cache import TeacherCache
from .teacher_signal import Prepared as _Prepared
from .teachers import TeacherSet

__all__ = ["Distiller", "GATES", "GATE_FITS"]

GATES = ("logit", "hidden", "mean", "features")
GATE_FITS = ("joint", "stacked")
TEACHER_ROWS = ("train", "merged")
# what fills augmented rows' label slots; never read (tests set it to 1 and expect the same run)
_AUG_LABEL_SLOT = 0.0


class Distiller(DistillerSignal, StudentTerms):
    """Distil an ensemble of CTR teachers into a student, by pre-training or co-training.

    ``mode="pretrain"``: the teachers are trained first (unless ``teachers_trained=True``), frozen,
    and their outputs cached once in a :class:`TeacherCache`; student epochs read the cache by
    sample index and never run a teacher. ``mode="cotrain"``: teachers, gate and student train
    together; each teacher learns from its own label loss, and the distillation gradient flows
    from teachers to student only (teacher logits enter the loss detached).

    Args:
        teachers: the M teacher models, or a trained :class:`~fastkd.train.teachers.TeacherSet`.
        student: the student model (one logit per sample; ``return_hidden`` for hints).
        mode: "pretrain" | "cotrain".
        gate: "logit" | "hidden" | "mean" | "features" (see :mod:`fastkd.gates`). Default
            (None): "features" in pre-train mode (a gate on the sample's fields, fitted on rows
            the teachers never saw and frozen; uniform unless those rows say otherwise), "logit"
            in co-train mode.
        gate_fit: "joint" (the paper's: the gate trains with the student on the student's rows) |
            "stacked" (fitted first on rows with honest teacher logits, stopped on the monitor
            rows, then frozen). Default: "stacked" for ``gate="features"`` (which has no joint
            form), "joint" otherwise; ``gate="mean"`` ignores it.
        ensemble: "logit" | "prob".
        temperature, hard_weight, kd_weight, gate_loss_weight: loss settings.
        hint_weight: weight of the hint loss ``‖W_i v_Ti − v_S‖²`` averaged over teachers (0: off).
        hint_normalize: compare L2-normalised hints (default). With the plain formula and W_i
            trained alongside, ``W_i = 0, v_S = 0`` is a minimum, and on Frappe the student
            collapsed to AUC 0.50 (see :func:`fastkd.functional.hint_loss`).
        config: optimisation and early stopping (:class:`TrainConfig`).
        teacher_config: settings for training the teachers (default: ``config.for_teachers()``).
        teachers_trained: the teachers are already trained (pre-train mode skips their training).
        cache_dir: keep the teacher cache, the augmented rows and the ensemble targets in
            memory-mapped files there (large data: none of them is then held in memory;
            ``fastkd distill`` uses a folder of the run's checkpoints when the rows are
            memory-mapped).
        teacher_folds: K >= 2 cross-fits the teachers on the student's training rows (see
            :func:`~fastkd.train.teachers.train_teachers`): K fold models per teacher, each training
            row's soft label from the one that did not see it, other rows' from their average.
            Costs about ``K·(K-1)/K`` teacher trainings per teacher. Not with hints or the hidden gate.
        augment: teacher-labelled rows per student training row (0: none); each epoch costs
            about ``(1 + augment)×``. Their hard-label term is off. Default (None): 1 in
            pre-train mode, 0 in co-train mode.
        augment_swap: per-field swap probability of :func:`~fastkd.augment.swap_augment`.
        teacher_rows: the rows the teachers train on (or, with ``teachers_trained=True``, trained
            on): "train" (the training split, stopped on the whole validation split; default) or
            "merged" (with ``config.merge_validation``, the student's rows: the training split and
            the merged validation rows, stopped on the monitor rows). With "merged" a stacked gate
            fits on one half of the monitor rows and stops on the other, the only rows no teacher
            saw. Cross-fitted teachers always use the student's rows.
        student_embed_init: None (the student's own initialisation; default) or "teacher": the
            student's embedding tables start as a copy of the trained teacher's with the best AUC
            on the monitor rows, among teachers of the student's field sizes and embedding width
            (:mod:`fastkd.train.embed_transfer`); pre-train mode only.

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
        teachers: Union[Sequence[nn.Module], TeacherSet],
        student: nn.Module,
        *,
        mode: str = "pretrain",
        gate: Optional[str] = None,
        gate_fit: Optional[str] = None,
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
        teacher_folds: int = 1,
        augment: Optional[float] = None,
        augment_swap: float = 0.2,
        teacher_rows: str = "train",
        student_embed_init: Optional[str] = None,
    ) -> None:
        if mode not in ("pretrain", "cotrain"):
            raise ValueError(f"mode must be 'pretrain' or 'cotrain', got {mode!r}")
        # defaults chosen on validation data of four datasets (docs/accuracy.md); co-training's
        # teachers move, so it keeps the paper's joint logit gate and no augmentation
        if gate is None:
            gate = "features" if mode == "pretrain" else "logit"
        if augment is None:
            augment = 1.0 if mode == "pretrain" else 0.0
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if gate_fit is None:
            gate_fit = "stacked" if gate == "features" else "joint"
        if gate_fit not in GATE_FITS:
            raise ValueError(f"gate_fit must be one of {GATE_FITS}, got {gate_fit!r}")
        if gate == "features" and gate_fit != "stacked":
            raise ValueError("gate='features' is fitted on honest rows and frozen: pass gate_fit='stacked'")
        if isinstance(teacher_folds, bool) or not isinstance(teacher_folds, int) or teacher_folds < 1:
            raise ValueError(f"teacher_folds must be an int >= 1, got {teacher_folds!r}")
        # the loss module's own checks, made here so a bad value fails before any teacher trains
        temperature = check_temperature(temperature)
        hard_weight, kd_weight, gate_loss_weight, hint_weight, augment, augment_swap = (
            check_weight(k, v) for k, v in (("hard_weight", hard_weight), ("kd_weight", kd_weight),
                                            ("gate_loss_weight", gate_loss_weight), ("hint_weight", hint_weight),
                                            ("augment", augment), ("augment_swap", augment_swap)))
        if config is not None and not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if teacher_config is not None and not isinstance(teacher_config, TrainConfig):
            raise TypeError(f"teacher_config must be a TrainConfig, got {type(teacher_config).__name__}")
        if not 0.0 < augment_swap <= 1.0:
            raise ValueError(f"augment_swap must be in (0, 1], got {augment_swap}")
        if teacher_rows not in TEACHER_ROWS:
            raise ValueError(f"teacher_rows must be one of {TEACHER_ROWS}, got {teacher_rows!r}")
        if isinstance(teachers, TeacherSet) and teachers.saw_validation:
            teacher_rows = "merged"  # the set knows its rows: its logits on merged rows are not honest
        if teacher_rows == "merged" and (mode != "pretrain" or not (config or TrainConfig()).merge_validation):
            raise ValueError("teacher_rows='merged' (or a TeacherSet trained on merged validation rows) needs "
                             "mode='pretrain' and config.merge_validation=True: the monitor rows are the only "
                             "rows its teachers never saw")
        check_embed_init(student_embed_init, mode)
        self.student_embed_init = student_embed_init
        self.teacher_rows = teacher_rows
        self.teacher_set: Optional[TeacherSet] = None
        if isinstance(teachers, TeacherSet):
            if teacher_folds not in (1, teachers.folds):
                raise ValueError(f"teacher_folds={teacher_folds} but the TeacherSet has {teachers.folds} folds")
            self.teacher_set, teacher_folds, teachers_trained = teachers, teachers.folds, True
            teachers = teachers.models
        if len(teachers) == 0:
            raise ValueError("at least one teacher is needed")
        self.teachers = nn.ModuleList(teachers)
        self.student = student
        self.mode = mode
        self.config = config or TrainConfig()
        self.teacher_config = teacher_config or self.config.for_teachers()
        if mode == "cotrain":
            if self.config.early_stop == "kd":
                raise ValueError("co-training stops on the student's validation AUC/logloss: the teachers "
                                 "(and so the distillation targets) move during training")
            if teacher_folds > 1 or augment > 0 or gate_fit == "stacked":
                raise ValueError("teacher_folds, augment and gate_fit='stacked' need frozen teachers: mode='pretrain'")
        self.teachers_trained = teachers_trained
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.hint_weight = float(hint_weight)
        self.needs_hidden = gate == "hidden" or self.hint_weight > 0
        if teacher_folds > 1 and self.needs_hidden:
            raise ValueError("cross-fitted teachers have one hidden basis per fold model: hints and "
                             "gate='hidden' need teacher_folds=1")
        self.gate = gate
        self.gate_fit = "stacked" if gate == "features" else gate_fit
        self.teacher_folds = teacher_folds
        self.augment = float(augment)
        self.augment_swap = float(augment_swap)
        self.temperature = float(temperature)
        self.hard_weight = float(hard_weight)
        self.kd_weight = float(kd_weight)
        self.ensemble = ensemble
        # teachers' hidden vectors are zero-padded to the widest one (see TeacherCache.build)
        self.hidden_dim = max(int(getattr(t, "hidden_dim", 0)) for t in self.teachers)
        # the loss module: the joint gate's parameters live here; other gates reduce to one
        # precomputed target per row (self.targets) and use the same loss with one "teacher"
        joint = mode == "cotrain" or (self.gate_fit == "joint" and gate in ("logit", "hidden"))
        self.joint_gate = joint
        self.loss = GatedDistillLoss(
            len(self.teachers) if joint else 1, temperature=temperature, hard_weight=hard_weight,
            kd_weight=kd_weight, gate=gate if joint else "mean",
            hidden_dim=self.hidden_dim if (joint and gate == "hidden") else None, ensemble=ensemble,
            gate_loss_weight=gate_loss_weight,
        )
        self.hints = None
        if self.hint_weight > 0:
            sd = int(getattr(student, "hidden_dim", 0))
            self.hints = nn.ModuleList(HintLoss(self.hidden_dim, sd, normalize=hint_normalize)
                                       for _ in self.teachers)
        self.stacked_gate: Optional[nn.Module] = None
        self.cache: Optional[TeacherCache] = None
        self.targets: Optional[torch.Tensor] = None
        self.summary: Dict[str, object] = {}
        self._prepared: Optional[_Prepared] = None  # the rows prepare() built the signal on
        self._keep_prepared = False  # kept after fit only when prepare() was called

    # -- checkpoints ---------------------------------------------------------------------------
    def _settings(self) -> dict:
        """The distillation settings a resumed student checkpoint must share (its manifest's
        ``distiller`` field); the TrainConfig and model shapes are checked by the loop itself."""
        crit = self.loss
        return {"mode": self.mode, "gate": self.gate, "gate_fit": self.gate_fit, "ensemble": self.ensemble,
                "temperature": self.temperature, "hard_weight": self.hard_weight, "kd_weight": self.kd_weight,
                "gate_loss_weight": float(crit.gate_loss_weight), "hint_weight": self.hint_weight,
                "hint_normalize": None if self.hints is None else bool(self.hints[0].normalize),
                "teacher_folds": self.teacher_folds, "augment": self.augment, "augment_swap": self.augment_swap,
                **({"teacher_rows": self.teacher_rows} if self.teacher_rows != "train" else {}),
                **({"student_embed_init": self.student_embed_init} if self.student_embed_init else {})}

    def _manifest(self, monitor_data: CTRData, frozen_teachers: bool):
        """The fields beyond rows, config and shapes that ``student.pt`` / ``cotrain.pt`` must
        match on resume: the monitor rows, the settings above and, for frozen teachers (whose
        outputs are the targets but not in the checkpoint), a digest of their weights."""
        def manifest() -> dict:
            out = {"monitor_data": data_fingerprint(monitor_data.ids, monitor_data.labels),
                   "distiller": self._settings()}
            if frozen_teachers:
                out["teachers"] = models_manifest(self.teachers)
            return out
        return manifest

    # -- fit ----------------------------------------------------------------------------------
    def fit(self, train: CTRData, valid: CTRData, *, checkpoint_dir: Optional[Union[str, Path]] = None,
            resume: bool = False, stop_after_epoch: Optional[int] = None,
            signal_from: Optional["Distiller"] = None) -> dict:
        """Train (teachers, then) the student. Returns a summary with per-phase histories.

        ``checkpoint_dir``: per-model checkpoints, rewritten after every epoch: ``teacher{i}[.fold{k}].pt``,
        then ``student.pt`` (``cotrain.pt`` in co-train mode). ``resume=True`` continues from them
        (a finished model is not retrained) and gives the uninterrupted run's result; a checkpoint
        written by another run (other rows, settings, shapes or teachers) raises
        :class:`~fastkd.train.manifest.ArtifactMismatchError` naming the file and the field, an
        unreadable one :class:`~fastkd.train.manifest.CorruptArtifactError`. The teacher cache is
        rebuilt on every fit (into ``cache_dir`` when set), never reused from an earlier run,
        except one :meth:`prepare` kept for the same ``train``/``valid``.

        ``signal_from``: another pre-train Distiller, prepared (:meth:`prepare`) on the
        same ``train``/``valid`` objects with the same settings, config and teacher models: its
        teacher cache, gate and targets are used as they are (the student trains exactly as with
        its own), and only the student's epochs run. Any difference raises ``ValueError``.
        """
        ckpt = Path(checkpoint_dir) if checkpoint_dir else None
        if self.mode == "cotrain":
            if signal_from is not None:
                raise ValueError("signal_from needs a pre-train Distiller: co-training has no fixed teacher signal")
            return self._fit_cotrain(train, valid, ckpt, resume, stop_after_epoch)
        cfg = self.config
        if signal_from is not None:
            self._adopt(signal_from, train, valid)
        p = self._prepared
        if p is None or p.train is not train or p.valid is not valid:
            self._prepare(train, valid, ckpt, resume)
            self._keep_prepared = False
            p = self._prepared
        student_train, monitor_data, aug_ids = p.student_train, p.monitor, p.aug_ids
        cache, targets = self.cache, self.targets
        n_real = len(student_train)

        def step(ids, y, index):
            real = index < n_real if len(aug_ids) else None
            if targets is not None:
                _, t_hidden = cache.gather(index) if self.hints is not None else (None, None)
                return self._student_loss(ids, y, targets[index], t_hidden, real)
            t_logits, t_hidden = cache.gather(index)
            return self._student_loss(ids, y, t_logits, t_hidden, real)

        if p.embed_source is not None:  # before the loop: a resumed checkpoint overwrites it
            copy_embedding(self.student, self.teachers[p.embed_source])
            self.summary["embed_from"] = p.embed_source
        if cfg.early_stop == "kd":
            monitor = self._kd_monitor(monitor_data)
        else:
            monitor = _label_monitor(self.student, monitor_data, cfg.early_stop, cfg.eval_batch_size)

        seed_everything(cfg.seed)
        # the real rows then the augmented ones, whose label slots are never read (their hard-label
        # and gate terms are off); memory-mapped rows (the on-disk cache) are read in place
        slot = np.broadcast_to(np.float32(_AUG_LABEL_SLOT), (len(aug_ids),))  # one value, no memory per row
        ids = as_tensor_rows(_with_rows(student_train.ids, aug_ids))
        labels = as_tensor_rows(_with_rows(student_train.labels, slot))
        loop = _Loop(self._student_modules(), self._student_params(), cfg, cfg.early_stop,
                     ckpt / "student.pt" if ckpt else None, resume, "student", stop_after_epoch,
                     manifest=self._manifest(monitor_data, frozen_teachers=True))
        self.summary["student"] = loop.run(ids, labels, step, monitor)
        if not self._keep_prepared:  # the rows a fit alone prepared (large at scale) go with it
            self._prepared = None
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
                     "co-train", stop_after_epoch, manifest=self._manifest(monitor_data, frozen_teachers=False))
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


def _with_rows(ids, aug_ids: np.ndarray):
    """The real rows then the augmented ones: a :class:`~fastkd.data.rows.Rows` view when the
    real rows are one (memory-mapped data), else the concatenated array."""
    if not len(aug_ids):
        return ids
    if isinstance(ids, Rows):
        return Rows([ids, aug_ids])
    return np.concatenate([ids, aug_ids])

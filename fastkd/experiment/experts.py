"""Ablation rows whose teachers are made to differ, each one unit of a run (:mod:`.runner`).

* ``partition``: D copies of the first teacher architecture, each on a disjoint random part of
  the training split (the paper's "D" row);
* ``segments``: one teacher per value of ``spec.segment_field``, each trained (and stopped) on
  that segment's rows alone, architectures in turn from ``spec.teachers``. Every teacher is good
  on its own segment and blind on the others, so a per-sample gate that reads the sample's fields
  must beat averaging here; the row's two students (mean and gate of the same experts) measure
  whether it does.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Dict

import numpy as np
import torch

from ..train import predict, scores
from ..train.teachers import TeacherSet, teacher_seed, train_teachers
from .spec import ExperimentSpec

if TYPE_CHECKING:  # the runner imports this module
    from .runner import _Run

__all__ = ["EXPERT_ABLATIONS", "partition", "segment_experts"]


def _students(run: "_Run", seed: int, spec: ExperimentSpec, unit: str, variant: str, models, seconds: float,
              distills=("gate",)):
    """The students of ``models`` (one per ``distills`` entry) and their gate weights, then the
    unit's finished record; returns the student records."""
    # pre-trained teachers on the training split alone, whatever the run's own teachers are
    d_spec = spec.with_overrides({"teacher_folds": 1, "mode": "pretrain", "teacher_rows": "train"})
    n_alphas = {k: len(v) for k, v in run.gate_alphas.items()}
    recs = [run.student(seed, d_spec, d, unit=f"{unit}/{'student' if d == 'gate' else d}", variant=variant,
                        teachers=TeacherSet(models), teacher_seconds=seconds, finish=False) for d in distills]
    return recs, [(k, a) for k, v in run.gate_alphas.items() for a in v[n_alphas.get(k, 0):]]


def partition(run: "_Run", seed: int, spec: ExperimentSpec, *, unit: str) -> None:
    """D teachers: copies of the first architecture on disjoint parts of the training split."""
    if run.finished(seed, unit) is not None:
        return
    first = len(run.records)
    m = len(spec.teachers)
    arch = spec.teachers[0]
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(run.train)), m)
    t0 = time.perf_counter()
    ckpt = run.unit_dir(seed, unit)
    models, valid_auc = [], []
    for i, p in enumerate(parts):
        model = run.build(arch, teacher_seed(seed, i))
        ts = train_teachers([model], run.train.subset(np.sort(p)), run.valid, spec.config.for_teachers(),
                            seed=seed, checkpoint_dir=None if ckpt is None else ckpt / f"part{i}",
                            resume=run.resume)
        models += ts.models
        valid_auc.append(scores(run.valid.labels, predict(model, run.valid))["auc"])
    (rec,), alphas = _students(run, seed, spec, unit, f"D: {m}x {arch} on data partitions", models,
                               time.perf_counter() - t0)
    rec["teacher_valid_auc"] = valid_auc
    run.finish(seed, unit, first, alphas)


def segment_experts(run: "_Run", seed: int, spec: ExperimentSpec, *, unit: str) -> None:
    """One teacher per segment value, trained and stopped on that segment's rows; students from
    their mean and from the gate (module docstring)."""
    if run.finished(seed, unit) is not None:
        return
    first = len(run.records)
    col = run.train.field_names.index(spec.segment_field)
    train_seg, valid_seg = np.asarray(run.train.ids[:, col]), np.asarray(run.valid.ids[:, col])
    values = np.unique(train_seg)
    variant = f"segment experts: one teacher per {spec.segment_field} value"
    t0 = time.perf_counter()
    ckpt = run.unit_dir(seed, unit)
    missing = [int(v) for v in values if not (valid_seg == v).any()]
    if missing:  # before any training
        raise ValueError(f"segments {spec.segment_field}={missing} have no validation rows to stop their teachers on")
    models, z = [], []
    for i, v in enumerate(values):
        arch = spec.teachers[i % len(spec.teachers)]
        model = run.build(arch, teacher_seed(seed, i))
        train_teachers([model], run.train.subset(np.flatnonzero(train_seg == v)),
                       run.valid.subset(np.flatnonzero(valid_seg == v)),
                       spec.config.for_teachers(), seed=seed,
                       checkpoint_dir=None if ckpt is None else ckpt / f"segment{int(v)}", resume=run.resume)
        models.append(model)
        z.append(predict(model, run.test))
        run.record(f"{arch} (segment {int(v)})", "teacher", "none", seed, z[-1], model, variant=variant)
    seconds = time.perf_counter() - t0
    run.record("ensemble (mean)", "ensemble", "mean", seed, torch.stack(z, 1).mean(1), variant=variant,
               teacher_seconds=round(seconds, 2))
    _, alphas = _students(run, seed, spec, unit, variant, models, seconds, distills=("mean", "gate"))
    run.finish(seed, unit, first, alphas)


# named ablation -> the unit that trains it
EXPERT_ABLATIONS: Dict[str, Callable[..., None]] = {"partition": partition, "segments": segment_experts}

"""Running an experiment: teachers, plain baseline and distilled students over seeds.

Every row of a table is trained with the same :class:`~fastkd.train.TrainConfig` (same budget,
same early-stopping rule on the same validation data), except rows that are ablations of it; an
ablation of a setting the plain DNN also has (the stopping rule, merged validation, ...) adds a
plain-DNN row under the same setting. Teachers are trained once per seed and teacher setting
(cross-fitted or not) and shared by every row that uses them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .. import distributed as _dist
from ..data import CTRData
from ..distiller import Distiller
from ..metrics import roc_auc
from ..models import build_model
from ..teachers import TeacherSet, teacher_seed, train_teachers
from ..train import predict, scores, train_model
from .spec import Ablation, ExperimentSpec, expand_ablations, split_overrides

__all__ = ["ExperimentResult", "run_experiment"]


@dataclass
class ExperimentResult:
    """One record per model and seed, and each gated student's test-set gate weights per seed."""

    records: List[dict]
    gate_alphas: Dict[str, List[np.ndarray]] = field(default_factory=dict)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _infer_rate(model: torch.nn.Module, data: CTRData, batch_size: int) -> float:
    ids = torch.from_numpy(data.ids)
    predict(model, ids[:batch_size], batch_size)  # warm-up
    t0 = time.perf_counter()
    predict(model, ids, batch_size)
    return len(data) / (time.perf_counter() - t0)


class _Run:
    """State of one experiment: data, spec, teacher sets, output records and logging."""

    def __init__(self, train, valid, test, spec: ExperimentSpec, log, partial: Optional[Path]) -> None:
        self.train, self.valid, self.test = train, valid, test
        self.spec = spec
        self.log = log
        self.partial = partial if _dist.is_main_process() else None  # rank 0 alone writes
        self.records: List[dict] = []
        self.gate_alphas: Dict[str, List[np.ndarray]] = {}
        self.teacher_sets: Dict[tuple, dict] = {}
        self.segments = None
        if spec.segment_field is not None:
            if spec.segment_field not in test.field_names:
                raise ValueError(f"segment field {spec.segment_field!r} is not a field of the data "
                                 f"({', '.join(test.field_names)})")
            self.segments = test.ids[:, test.field_names.index(spec.segment_field)]

    def build(self, name: str, seed: int):
        torch.manual_seed(seed)
        return build_model(name, self.train.field_sizes, **self.spec.model_kwargs)

    def segment_auc(self, logits: torch.Tensor) -> Dict[str, float]:
        z = logits.detach().double().numpy()
        out = {}
        for v in np.unique(self.segments):
            sel = self.segments == v
            y = self.test.labels[sel]
            if 0 < y.sum() < len(y):
                out[str(int(v))] = roc_auc(y, z[sel])
        return out

    def record(self, model_name, role, distill, seed, logits, model=None, *, variant="", summary=None,
               seconds=0.0, **extra):
        rec = {"model": model_name, "role": role, "distill": distill, "variant": variant, "seed": seed,
               **scores(self.test.labels, logits)}
        if model is not None:
            rec["params"] = _params(model)
            rec["infer_samples_per_s"] = _infer_rate(model, self.test, self.spec.config.eval_batch_size)
        if summary is not None:
            st = summary.get("student", summary)
            rec["epochs"] = st["epochs"]
            rec["best_epoch"] = st["best_epoch"]
            rates = [h["samples_per_s"] for h in st["history"]]
            rec["train_samples_per_s"] = float(np.median(rates)) if rates else None
            times = [h["train_seconds"] for h in st["history"]]
            rec["epoch_seconds"] = round(float(np.median(times)), 3) if times else None
        if self.segments is not None:
            rec["segment_auc"] = self.segment_auc(logits)
        rec["seconds"] = round(seconds, 2)
        rec.update(extra)
        self.records.append(rec)
        if self.partial is not None:  # a long run keeps what it has finished if it is stopped
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.partial.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.records, indent=1))
            tmp.replace(self.partial)
        label = f"{model_name}" + (f" [{variant}]" if variant else "")
        self.log(f"  seed {seed}  {label:44s} AUC {rec['auc']:.4f}  logloss {rec['logloss']:.4f}  ({seconds:.0f}s)")
        return rec

    # ------------------------------------------------------------------------------------------
    def teacher_set(self, seed: int, spec: ExperimentSpec, variant: str = "") -> dict:
        """The teachers for ``spec``'s teacher settings (trained on first use, then shared)."""
        cfg = spec.config
        folds = spec.teacher_folds
        key = (seed, folds) if folds == 1 else (seed, folds, cfg.merge_validation, cfg.monitor_fraction)
        if key in self.teacher_sets:
            return self.teacher_sets[key]
        models = [self.build(n, teacher_seed(seed, i)) for i, n in enumerate(spec.teachers)]
        student_rows, monitor = cfg.split_validation(self.train, self.valid)
        # folds == 1: trained on the training split, stopped on the validation split; folds > 1:
        # cross-fitted on the student's training rows, so the monitor rows stay unseen
        rows, stop = (self.train, self.valid) if folds == 1 else (student_rows, monitor)
        ts = train_teachers(models, rows, stop, cfg.for_teachers(), folds=folds, seed=seed, names=spec.teachers,
                            log=self.log)
        tvariant = variant or ""
        test_logits = []
        for i, (name, model) in enumerate(zip(spec.teachers, ts.models)):
            z = predict(model, self.test)
            test_logits.append(z)
            secs = sum(s["seconds"] for s in ts.summaries[i])
            summ = ts.summaries[i][0] if folds == 1 else None
            self.record(name, "teacher", "none", seed, z, model, variant=tvariant, summary=summ, seconds=secs,
                        teacher_seconds=round(secs, 2), teacher_folds=folds)
        ens = torch.stack(test_logits, 1).mean(1)
        self.record("ensemble (mean)", "ensemble", "mean", seed, ens, variant=tvariant,
                    teacher_seconds=round(ts.seconds, 2), teacher_folds=folds)
        monitor_auc = [scores(monitor.labels, predict(m, monitor))["auc"] for m in ts.models]
        entry = {"set": ts, "monitor_auc": monitor_auc, "seconds": ts.seconds}
        self.teacher_sets[key] = entry
        return entry

    def student(self, seed: int, spec: ExperimentSpec, distill: str, *, variant: str = "",
                extra: Optional[dict] = None, teachers: Optional[TeacherSet] = None, teacher_seconds=None):
        extra = dict(extra or {})
        cfg = spec.config
        if distill in ("single", "mean"):
            gate, gate_fit = "mean", None
        else:
            gate, gate_fit = spec.gate, spec.gate_fit
        mode = spec.mode
        extra_rec: Dict[str, object] = {}
        if mode == "cotrain":
            tset = [self.build(n, teacher_seed(seed, i)) for i, n in enumerate(spec.teachers)]
            tsecs = 0.0
        elif teachers is not None:
            tset, tsecs = teachers, teacher_seconds or 0.0
        else:
            entry = self.teacher_set(seed, spec)
            tset, tsecs = entry["set"], entry["seconds"]
            if distill == "single":
                best = int(np.argmax(entry["monitor_auc"]))
                extra_rec = {"teacher": spec.teachers[best]}
                tset = TeacherSet([tset.models[best]], tset.folds, tset.fold_of, tset.fitted)
        student = self.build(spec.student, seed * 100)
        kd = Distiller(tset, student, mode=mode, gate=gate, gate_fit=gate_fit, ensemble=spec.ensemble,
                       temperature=spec.temperature, hard_weight=spec.hard_weight, kd_weight=spec.kd_weight,
                       teachers_trained=mode == "pretrain", augment=spec.augment, augment_swap=spec.augment_swap,
                       config=_with_seed(cfg, seed), **extra)
        t0 = time.perf_counter()
        summ = kd.fit(self.train, self.valid)
        secs = time.perf_counter() - t0
        # the Distiller resolves the default gate fit; the label names the one it used
        gname = "single" if distill == "single" else "mean" if gate == "mean" else f"{kd.gate}/{kd.gate_fit}"
        rec = self.record(f"{spec.student} ({distill})", "student", distill, seed, kd.predict(self.test), student,
                          variant=variant, summary=summ, seconds=secs, gate=gname,
                          teacher_seconds=round(tsecs, 2), augmented_rows=summ.get("augmented_rows", 0),
                          cache_seconds=round(summ.get("cache_seconds", 0.0), 2))
        rec.update(extra_rec)
        if "gate" in summ:
            rec["gate_fit_summary"] = {k: v for k, v in summ["gate"].items() if k != "history"}
        if distill == "gate" and gate != "mean" and mode == "pretrain":
            self.record("ensemble (gate)", "ensemble", "gate", seed, kd.ensemble_logits(self.test),
                        variant=variant, gate=gname)
            label = gname + (f" [{variant}]" if variant else "")
            self.gate_alphas.setdefault(label, []).append(kd.gate_weights(self.test).numpy())
        return rec

    def plain(self, seed: int, spec: ExperimentSpec, variant: str = ""):
        model = self.build(spec.student, seed * 100)
        t0 = time.perf_counter()
        summ = train_model(model, self.train, self.valid, _with_seed(spec.config, seed), desc="plain student")
        return self.record(spec.student, "student", "none", seed, predict(model, self.test), model,
                           variant=variant, summary=summ, seconds=time.perf_counter() - t0)

    def partition(self, seed: int, spec: ExperimentSpec, ab: Ablation):
        """D teachers: copies of the first architecture on disjoint parts of the training split."""
        m = len(spec.teachers)
        arch = spec.teachers[0]
        rng = np.random.default_rng(seed)
        parts = np.array_split(rng.permutation(len(self.train)), m)
        t0 = time.perf_counter()
        models, valid_auc = [], []
        for i, p in enumerate(parts):
            model = self.build(arch, teacher_seed(seed, i))
            ts = train_teachers([model], self.train.subset(np.sort(p)), self.valid, spec.config.for_teachers(),
                                seed=seed)
            models += ts.models
            valid_auc.append(scores(self.valid.labels, predict(model, self.valid))["auc"])
        d_spec = spec.with_overrides({"teacher_folds": 1})
        rec = self.student(seed, d_spec, "gate", variant=f"D: {m}x {arch} on data partitions",
                           teachers=TeacherSet(models), teacher_seconds=time.perf_counter() - t0)
        rec["teacher_valid_auc"] = valid_auc


def _with_seed(cfg, seed):
    import dataclasses
    return dataclasses.replace(cfg, seed=seed)


def run_experiment(train: CTRData, valid: CTRData, test: CTRData, spec: ExperimentSpec,
                   log=print, partial: Optional[Path] = None) -> ExperimentResult:
    """Train every row of the table for every seed.

    Rows per seed: each teacher and their mean ensemble, the plain DNN, students distilled from the
    mean and (unless ``spec.gate`` is "mean") from the gate, then one row per ablation
    (:func:`~fastkd.experiment.spec.parse_ablation`; "single": the best single teacher on the
    monitor rows).
    With ``partial``, the records finished so far are rewritten to that JSON file after each one.
    """
    ablations = expand_ablations(spec.ablations, spec)
    run = _Run(train, valid, test, spec, log, partial)
    for seed in spec.seeds:
        log(f"seed {seed}: teachers {', '.join(spec.teachers)}"
            + (f", cross-fitted in {spec.teacher_folds} folds" if spec.teacher_folds > 1 else ""))
        run.teacher_set(seed, spec)
        run.plain(seed, spec)
        if len(spec.teachers) > 1:
            run.student(seed, spec, "mean")
            if spec.gate != "mean":
                run.student(seed, spec, "gate")
        for ab in ablations:
            if ab.name == "single":  # the best single teacher on the monitor rows
                run.student(seed, spec, "single")
                continue
            if ab.name == "partition":
                run.partition(seed, spec, ab)
                continue
            known, extra = split_overrides(ab.overrides)
            sub = spec.with_overrides(known)
            if sub.teacher_folds != spec.teacher_folds and sub.mode == "pretrain":
                run.teacher_set(seed, sub, variant=f"teacher_folds={sub.teacher_folds}")
            if ab.plain:
                run.plain(seed, sub, variant=ab.label)
            distill = "mean" if sub.gate == "mean" else "gate"
            run.student(seed, sub, distill, variant=ab.label, extra=extra)
    return ExperimentResult(run.records, run.gate_alphas)

"""Running an experiment: teachers, plain baseline and distilled students over seeds.

Every row of a table is trained with the same :class:`~fastkd.train.TrainConfig` (same budget,
same early-stopping rule on the same validation data), except rows that are ablations of it; an
ablation of a setting the plain DNN also has (the stopping rule, merged validation, ...) adds a
plain-DNN row under the same setting. Teachers are trained once per seed and teacher setting
(cross-fitted or not) and shared by every row that uses them.

Resuming (``checkpoint_dir=``): the run is cut into *units*, each one training; finished units
are recorded and loaded back (:mod:`fastkd.experiment.records` has the layout).

Distilled students (:mod:`fastkd.experiment.students`). Shared work: a student's dropout candidates share one prepared teacher signal (cache, gate,
targets; ``Distiller.prepare`` and ``fit(signal_from=...)``), and a gated student whose targets
equal this process's mean student's (same teachers, settings and candidates; the stacked gate was
reset to averaging) reuses that student and records ``student_from``: training it again gives the
same model, so only timings change.

Serving (``student_dir=``, ``serving=True``): the first seed's default student (the gated one,
or the mean one with ``gate="mean"``) is saved to ``student_dir`` when trained
(:func:`fastkd.serving.save_student`), and its serving cost against the teacher ensemble goes to
its record as ``"serving"`` (:func:`fastkd.serving.serving_benchmark`); both happen before the
unit's finished record, so a resumed run keeps them.

Records, finished units and their checkpoint folders: :mod:`fastkd.experiment.records`; the run
folder's format and the checks ``--resume`` makes: :mod:`fastkd.experiment.resume`.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from ..data import CTRData
from ..models import build_model
from ..train.manifest import CorruptArtifactError
from ..serving import save_student, serving_benchmark
from ..serving.raw_rows import ENCODER_FILE
from ..train.teachers import TeacherSet, fingerprint, teacher_seed, train_teachers
from ..train import predict, scores, train_model
from .resume import RUN_FILE, _start, check_resume, run_manifest
from .resume import run_ids as _run_ids
from .candidates import candidate_dir, choice_fields, train_candidates
from .experts import EXPERT_ABLATIONS
from .records import ExperimentResult, RunRecords
from .students import StudentUnits, _with_seed
from .spec import ExperimentSpec, expand_ablations, split_overrides

__all__ = ["ExperimentResult", "run_experiment", "run_manifest", "check_resume", "RUN_FILE"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:48] or "row"


class _Teachers:
    """A teacher set's entry: the set (trained now, or loaded from its checkpoints on first use
    when the unit finished in an earlier run), the monitor AUCs and the training seconds."""

    def __init__(self, monitor_auc: List[float], seconds: float, ts: Optional[TeacherSet] = None,
                 load: Optional[Callable[[], TeacherSet]] = None) -> None:
        self.monitor_auc, self.seconds = monitor_auc, seconds
        self._set, self._load = ts, load

    @property
    def set(self) -> TeacherSet:
        if self._set is None:
            self._set = self._load()
        return self._set


class _Run(StudentUnits, RunRecords):
    """State of one experiment: data, spec, teacher sets and the students' shared work, on top of
    the records and finished units (:class:`~fastkd.experiment.records.RunRecords`)."""

    def __init__(self, train, valid, test, spec: ExperimentSpec, log, partial: Optional[Path],
                 checkpoint_dir: Optional[Path] = None, resume: bool = False, run_ids: tuple = ("",),
                 on_finished: Optional[Callable[[ExperimentResult], None]] = None,
                 student_dir: Optional[Path] = None, serving: bool = False) -> None:
        super().__init__(test, spec, log, partial, checkpoint_dir, resume, run_ids, on_finished)
        self.train, self.valid = train, valid
        self.student_dir, self.serving = student_dir, serving
        self.teacher_sets: Dict[tuple, _Teachers] = {}
        # this seed's mean students trained in this process, by _signal_key (for gated reuse)
        self.mean_students: Dict[tuple, dict] = {}

    def seed_done(self, seed: int) -> None:
        super().seed_done(seed)
        self.mean_students.clear()

    def build(self, name: str, seed: int, model_kwargs: Optional[dict] = None):
        """Model ``name`` seeded with ``seed``, with ``model_kwargs`` (default: the spec's; students
        get ``spec.student_kwargs``)."""
        torch.manual_seed(seed)
        return build_model(name, self.train.field_sizes,
                           **(self.spec.model_kwargs if model_kwargs is None else model_kwargs))

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def teacher_key(seed: int, spec: ExperimentSpec) -> tuple:
        """What tells ``spec``'s teacher set apart: the same key, the same teachers."""
        cfg = spec.config
        if spec.teacher_folds == 1 and spec.teacher_rows == "train":
            return (seed, 1)
        # on the student's rows (cross-fitted, or teacher_rows="merged"): those rows decide
        rows = "merged" if spec.teacher_folds == 1 else "folds"
        return (seed, spec.teacher_folds, rows, cfg.merge_validation, cfg.monitor_fraction)

    def teacher_set(self, seed: int, spec: ExperimentSpec, variant: str = "") -> _Teachers:
        """The teachers for ``spec``'s teacher settings (trained on first use, then shared)."""
        cfg = spec.config
        folds = spec.teacher_folds
        # teacher_rows="merged": on the student's rows (as cross-fitted ones), stopped on the monitor rows
        merged = folds == 1 and spec.teacher_rows == "merged"
        key = self.teacher_key(seed, spec)
        if key in self.teacher_sets:
            return self.teacher_sets[key]
        unit = "teachers" if key == (seed, 1) else \
            f"teachers-folds{folds}-merge{int(cfg.merge_validation)}-monitor{cfg.monitor_fraction:g}" + \
            ("-merged" if merged else "")
        student_rows, monitor = cfg.split_validation(self.train, self.valid)
        # folds == 1: trained on the training split, stopped on the validation split; folds > 1
        # or merged: on the student's training rows (cross-fitted when folds > 1), so the monitor
        # rows stay unseen
        rows, stop = (self.train, self.valid) if folds == 1 and not merged else (student_rows, monitor)

        def train(log=self.log) -> TeacherSet:
            models = [self.build(n, teacher_seed(seed, i)) for i, n in enumerate(spec.teachers)]
            ts = train_teachers(models, rows, stop, cfg.for_teachers(), folds=folds, seed=seed,
                                names=spec.teachers, log=log, checkpoint_dir=self.unit_dir(seed, unit),
                                resume=self.resume)
            if merged:  # the rows it saw, checked by the Distiller
                ts.saw_validation, ts.fitted = True, fingerprint(rows)
            return ts

        done = self.finished(seed, unit)
        if done is not None:  # trained by an earlier run: the weights come from its checkpoints if needed
            if not isinstance(done.get("monitor_auc"), list) or not isinstance(done.get("seconds"), (int, float)):
                raise CorruptArtifactError(self._finished_path(seed, unit), "corrupt",
                                           "no 'monitor_auc' list or 'seconds' number")

            def load() -> TeacherSet:
                if not (self.unit_dir(seed, unit) or Path()).is_dir():  # deleted when its seed finished
                    self.log(f"  seed {seed}: the checkpoints of {unit} are gone (their seed had finished): "
                             f"retraining them for a new row (deterministic, about {done['seconds']:.0f} s)")
                return train(log=None)

            entry = _Teachers(done["monitor_auc"], done["seconds"], load=load)
            self.teacher_sets[key] = entry
            return entry
        first = len(self.records)
        ts = train()
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
        entry = _Teachers(monitor_auc, ts.seconds, ts)
        self.teacher_sets[key] = entry
        self.finish(seed, unit, first, keep=True, monitor_auc=monitor_auc, seconds=ts.seconds)
        return entry

    def serve(self, seed: int, spec: ExperimentSpec, student, teachers, rec: dict) -> None:
        """The default student of the run (rank 0): saved to ``student_dir``, and its serving cost
        against ``teachers`` added to its record ``rec`` (``serving=True``)."""
        if not self.main:
            return
        if self.student_dir is not None:
            info = {"seed": seed, "row": rec["model"], "distill": rec["distill"], "gate": rec.get("gate"),
                    "test_auc": rec["auc"], "test_logloss": rec["logloss"]}
            if (Path(self.student_dir) / ENCODER_FILE).is_file():  # written by the CLI for file data
                info["encoder_file"] = ENCODER_FILE  # so a student found without it is refused, not shipped bare
            path = save_student(self.student_dir, student, name=spec.student, model_kwargs=spec.student_kwargs,
                                check=self.test, info=info)
            self.log(f"  student saved to {path} (`fastkd export` writes it as TorchScript and ONNX)")
        if self.serving:
            with torch.random.fork_rng(devices=[]):  # the later rows' random draws stay as without it
                rec["serving"] = serving_benchmark(
                    student, list(teachers), self.test, student_label=rec["model"],
                    ensemble_label=f"teacher ensemble ({', '.join(spec.teachers)})")
            sv = rec["serving"]
            self._write_partial()
            self.log(f"  serving cost measured ({sv['seconds']:.1f} s"
                     + (f"; ONNX: max |logit - PyTorch logit| {sv['onnx_check']['max_abs_diff']:.2g} on the test split"
                        if sv["onnx_check"] else f"; ONNX skipped: {sv['onnx_skipped']}") + ")")

    def plain(self, seed: int, spec: ExperimentSpec, *, unit: str, variant: str = ""):
        if self.finished(seed, unit) is not None:
            return
        first = len(self.records)
        cands = spec.student_candidates()

        def fit(i: int, c: ExperimentSpec):
            model = self.build(c.student, seed * 100, c.student_kwargs)
            t0 = time.perf_counter()
            ckpt = candidate_dir(self.unit_dir(seed, unit), c, i, len(cands) > 1)
            summ = train_model(model, self.train, self.valid, _with_seed(c.config, seed), desc="plain student",
                               checkpoint=None if ckpt is None else ckpt / "model.pt", resume=self.resume)
            return model, summ, time.perf_counter() - t0

        model, pick, summaries, times = train_candidates(cands, spec.config.early_stop, fit)
        self.record(spec.student, "student", "none", seed, predict(model, self.test), model,
                    variant=variant, summary=summaries[pick], seconds=sum(times),
                    **choice_fields(cands, summaries, times, pick))
        self.finish(seed, unit, first)


def run_experiment(train: CTRData, valid: CTRData, test: CTRData, spec: ExperimentSpec,
                   log=print, partial: Optional[Path] = None, *,
                   checkpoint_dir: Optional[Union[str, Path]] = None, resume: bool = False,
                   on_finished: Optional[Callable[[ExperimentResult], None]] = None,
                   student_dir: Optional[Union[str, Path]] = None, serving: bool = False) -> ExperimentResult:
    """Train every row of the table for every seed.

    Rows per seed: each teacher and their mean ensemble, the plain DNN, students distilled from the
    mean and (unless ``spec.gate`` is "mean") from the gate, then one row per ablation
    (:func:`~fastkd.experiment.spec.parse_ablation`; "single": the best single teacher on the
    monitor rows).
    With ``partial``, the records finished so far are rewritten to that JSON file after each one.

    ``checkpoint_dir``: every model checkpointed there and every finished unit recorded (see the
    module docstring). A fresh run (``resume=False``) first deletes an earlier run's checkpoints and
    records there. ``resume=True`` continues the run recorded there: finished units are loaded, not
    trained, the rest resume from their checkpoints, and the result equals an uninterrupted run's
    (timings aside, and ``student_from``: a gated student reuses the mean student only when that
    one trained in the same process); it raises when there is nothing to resume or the settings or data differ
    (:func:`check_resume`). ``on_finished(result so far)`` is called (rank 0) after every unit.

    ``student_dir``: the first seed's default student is saved there (``fastkd distill`` passes
    ``<out>/student``); ``serving=True`` adds its serving cost against the teacher ensemble to
    its record (``"serving"``; see the module docstring). Neither is part of the run's settings.
    """
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    ablations = expand_ablations(spec.ablations, spec)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    run_ids = ("",)
    if ckpt is not None:
        manifest = check_resume(ckpt, spec, train, valid, test) if resume else run_manifest(spec, train, valid, test)
        _start(ckpt, manifest, resume)
        run_ids = _run_ids(manifest)
    run = _Run(train, valid, test, spec, log, partial, ckpt, resume, run_ids, on_finished,
               Path(student_dir) if student_dir is not None else None, serving)
    for seed in spec.seeds:
        log(f"seed {seed}: teachers {', '.join(spec.teachers)}"
            + (f", cross-fitted in {spec.teacher_folds} folds" if spec.teacher_folds > 1 else ""))
        run.teacher_set(seed, spec)
        run.plain(seed, spec, unit="plain")
        if len(spec.teachers) > 1:
            first = seed == spec.seeds[0]
            run.student(seed, spec, "mean", unit="student-mean", serve=first and spec.gate == "mean")
            if spec.gate != "mean":
                run.student(seed, spec, "gate", unit="student-gate", serve=first)
        for j, ab in enumerate(ablations):
            unit = f"ablation{j}-{_slug(ab.name)}"
            if ab.name == "single":  # the best single teacher on the monitor rows
                run.student(seed, spec, "single", unit=unit)
                continue
            if ab.name in EXPERT_ABLATIONS:  # teachers made to differ: their own unit
                EXPERT_ABLATIONS[ab.name](run, seed, spec, unit=unit)
                continue
            known, extra = split_overrides(ab.overrides)
            sub = spec.with_overrides(known)
            if sub.mode == "pretrain" and run.teacher_key(seed, sub) != run.teacher_key(seed, spec):
                run.teacher_set(seed, sub, variant=ab.label)  # its own teachers: recorded under the row's label
            if ab.plain:
                run.plain(seed, sub, unit=f"{unit}-plain", variant=ab.label)
            distill = "mean" if sub.gate == "mean" else "gate"
            run.student(seed, sub, distill, unit=unit, variant=ab.label, extra=extra)
        run.seed_done(seed)
    return run.result()

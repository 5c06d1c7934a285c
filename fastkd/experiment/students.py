"""The distilled students of an experiment: one :class:`~fastkd.train.Distiller` per dropout
candidate on one shared teacher signal, and the reuse of the mean student by a gated one whose
gate was reset to averaging.

:class:`StudentUnits` is a mixin of the experiment's run state (``runner._Run``, which holds the
data, teacher sets, records and the memo of mean students these methods read).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .. import distributed as _dist
from ..data.rows import is_file_backed
from ..train.distiller import Distiller
from ..train.teachers import TeacherSet, teacher_seed
from .candidates import candidate_dir, choice_fields, train_candidates
from .spec import ExperimentSpec

__all__ = ["StudentUnits"]


class StudentUnits:
    """Distilled-student units of a run (a mixin of ``runner._Run``)."""

    def student(self, seed: int, spec: ExperimentSpec, distill: str, *, unit: str, variant: str = "",
                extra: Optional[dict] = None, teachers: Optional[TeacherSet] = None, teacher_seconds=None,
                finish: bool = True, serve: bool = False):
        """One distilled student, the unit ``unit`` (``finish=False``: part of a larger unit);
        ``serve``: the run's default student (:meth:`serve`)."""
        if finish and self.finished(seed, unit) is not None:
            return None
        first = len(self.records)
        extra = dict(extra or {})
        cfg = spec.config
        if distill in ("single", "mean"):
            gate, gate_fit = "mean", None
        else:
            gate, gate_fit = spec.gate, spec.gate_fit
        mode = spec.mode
        extra_rec: Dict[str, object] = {}
        # co-training: every candidate builds its own teachers (the Distiller trains them)
        tset, tsecs = (None, 0.0) if mode == "cotrain" else (teachers, teacher_seconds or 0.0)
        if mode != "cotrain" and teachers is None:
            entry = self.teacher_set(seed, spec)
            tset, tsecs = entry.set, entry.seconds
            if distill == "single":
                best = int(np.argmax(entry.monitor_auc))
                extra_rec = {"teacher": spec.teachers[best]}
                tset = dataclasses.replace(tset, models=[tset.models[best]], summaries=[], seconds=0.0)
        udir = self.unit_dir(seed, unit)
        cands = spec.student_candidates()
        many = len(cands) > 1
        # the teacher signal (cache, gate, targets) is prepared once and shared by every candidate
        t0 = time.perf_counter()
        source = self._distiller(seed, cands[0], tset, gate, gate_fit, extra, candidate_dir(udir, cands[0], 0, many))
        if mode == "pretrain":
            source.prepare(self.train, self.valid, checkpoint_dir=candidate_dir(udir, cands[0], 0, many),
                           resume=self.resume)
        prep_secs = time.perf_counter() - t0
        # the key (a digest of every target) only where it can be used: a mean student a gated
        # one of the same spec follows, or that gated student
        wanted = _REUSE_SAME_SIGNAL and (distill == "gate" or (distill == "mean" and spec.gate != "mean"))
        key = _signal_key(seed, source, cands, extra) if wanted else None
        same = self.mean_students.get(key) if distill == "gate" and key is not None else None
        # every rank reuses, or none (each rank sees every rank's answer)
        if _dist.get_world_size() > 1 and distill == "gate" and not all(_dist.all_gather_object(same is not None)):
            same = None
        if same is not None:
            # the gate was reset to averaging: the student would train exactly as the mean one did
            kd, student = source, same["student"]
            kd.student = student
            pick, summaries, times, cands = same["pick"], same["summaries"], same["times"], same["cands"]
            summ = {**summaries[pick], **{k: source.summary[k] for k in ("gate", "cache_seconds", "augmented_rows")
                                          if k in source.summary}}
            secs = prep_secs
            extra_rec["student_from"] = same["label"]
            self.log(f"  seed {seed}  {spec.student} ({distill}): its targets equal the mean student's "
                     f"(the gate was not kept): that student is reused, not trained again")
        else:
            def fit(i: int, c: ExperimentSpec):
                kd = source if i == 0 else self._distiller(seed, c, tset, gate, gate_fit, extra,
                                                           candidate_dir(udir, c, i, many))
                t = time.perf_counter()
                summ = kd.fit(self.train, self.valid, checkpoint_dir=candidate_dir(udir, c, i, many),
                              resume=self.resume, signal_from=source if mode == "pretrain" else None)
                return (kd, kd.student), summ, time.perf_counter() - t + (prep_secs if i == 0 else 0.0)

            (kd, student), pick, summaries, times = train_candidates(cands, cfg.early_stop, fit)
            summ, secs = summaries[pick], sum(times)
            if distill == "mean" and key is not None:
                # the teachers are held so that their ids in the key stay theirs
                self.mean_students[key] = {"student": student, "pick": pick, "summaries": summaries, "times": times,
                                           "cands": cands, "teachers": tuple(kd.teachers),
                                           "label": f"{spec.student} (mean)" + (f" [{variant}]" if variant else "")}
        # what scoring and serving need stays (student, teachers, gate); the transfer cache and
        # targets (large at scale) go
        source.release()
        kd.release()
        # the Distiller resolves the default gate fit; the label names the one it used
        gname = "single" if distill == "single" else "mean" if gate == "mean" else f"{kd.gate}/{kd.gate_fit}"
        rec = self.record(f"{spec.student} ({distill})", "student", distill, seed, kd.predict(self.test), student,
                          variant=variant, summary=summ, seconds=secs, gate=gname,
                          teacher_seconds=round(tsecs, 2), augmented_rows=summ.get("augmented_rows", 0),
                          cache_seconds=round(summ.get("cache_seconds", 0.0), 2),
                          **choice_fields(cands, summaries, times, pick))
        rec.update(extra_rec)
        if "gate" in summ:
            rec["gate_fit_summary"] = {k: v for k, v in summ["gate"].items() if k != "history"}
        if serve:
            self.serve(seed, cands[pick], student, kd.teachers, rec)
        alphas = []
        if distill == "gate" and gate != "mean" and mode == "pretrain":
            self.record("ensemble (gate)", "ensemble", "gate", seed, kd.ensemble_logits(self.test),
                        variant=variant, gate=gname)
            label = gname + (f" [{variant}]" if variant else "")
            alphas.append((label, kd.gate_weights(self.test).numpy()))
            self.gate_alphas.setdefault(label, []).append(alphas[-1][1])
        if finish:
            self.finish(seed, unit, first, alphas)
        return rec

    def _distiller(self, seed: int, spec: ExperimentSpec, tset: Optional[TeacherSet], gate: str, gate_fit,
                   extra: dict, udir: Optional[Path]) -> Distiller:
        """The Distiller of one dropout candidate's student (not fitted)."""
        cfg, mode = spec.config, spec.mode
        if mode == "cotrain":
            tset = [self.build(n, teacher_seed(seed, i)) for i, n in enumerate(spec.teachers)]
        student = self.build(spec.student, seed * 100, spec.student_kwargs)
        # memory-mapped rows: the teacher outputs and augmented rows go to files too
        cache_dir = udir / "cache" if udir is not None and is_file_backed(self.train.ids) else None
        return Distiller(tset, student, mode=mode, gate=gate, gate_fit=gate_fit, ensemble=spec.ensemble,
                         temperature=spec.temperature, hard_weight=spec.hard_weight, kd_weight=spec.kd_weight,
                         teachers_trained=mode == "pretrain", augment=spec.augment, augment_swap=spec.augment_swap,
                         teacher_rows=spec.teacher_rows if mode == "pretrain" else "train",
                         hint_weight=spec.hint_weight, student_embed_init=spec.student_embed_init,
                         config=_with_seed(cfg, seed), cache_dir=cache_dir, **extra)


def _signal_key(seed: int, kd: Distiller, cands, extra: dict) -> Optional[tuple]:
    """What decides a prepared student's training besides its gate: equal keys (the targets'
    digest among them) train equal students. None where targets are not all there is to it
    (joint gate, co-training, the kd monitor, which reads the gate)."""
    if kd.targets is None or kd.mode != "pretrain" or kd.config.early_stop == "kd":
        return None
    digest = hashlib.sha256()
    t = kd.targets
    for a in range(0, len(t), 1 << 20):  # in blocks: memory-mapped targets stay on disk
        digest.update(t[a:a + (1 << 20)].numpy().tobytes())
    settings = {k: v for k, v in kd._settings().items() if k not in ("gate", "gate_fit")}
    # the teacher models themselves (the memo holds them, so their ids are not reused meanwhile)
    return (seed, tuple(id(m) for m in kd.teachers), digest.hexdigest(), repr(sorted(settings.items())),
            repr(sorted(extra.items())), tuple((c.student, repr(c.student_kwargs), repr(c.config)) for c in cands))


# a gated student whose targets equal the mean student's reuses it (the gate was reset to averaging)
_REUSE_SAME_SIGNAL = True


def _with_seed(cfg, seed):
    return dataclasses.replace(cfg, seed=seed)

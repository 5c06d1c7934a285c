"""The records of a run and its finished units: what :func:`~fastkd.experiment.run_experiment`
keeps, writes as it goes and loads back on resume.

Resuming (``checkpoint_dir=``): the run is cut into *units*, each one training (a teacher set, the
plain DNN, one student or ablation row of one seed). Layout of ``checkpoint_dir``:

* ``run.json``: the run's settings and data fingerprints (:func:`~fastkd.experiment.resume.run_manifest`), written when a
  fresh run starts; ``resume=True`` refuses a run whose settings or data differ
  (:func:`~fastkd.experiment.resume.check_resume`, the error names the first field that differs), but may add seeds;
* ``seed{S}/{unit}/``: the per-epoch checkpoints of the unit's models (``train_model`` /
  ``train_teachers`` / ``Distiller.fit`` checkpoints), continued on resume;
* ``seed{S}/{unit}.finished.json``: written (temporary name, then rename) when the unit is done:
  its records and what later units need (the teachers' monitor AUCs), and beside it
  ``{unit}.alphas{i}.npy`` for gate weights. A resumed run loads a finished unit instead of
  training it; a finished teacher set's weights come back from its checkpoints (zero epochs run).

A finished unit's checkpoints are deleted at once, a teacher set's when its seed is done, so the
disk holds one seed's teachers and the model in training, plus the small finished records.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import distributed as _dist
from ..atomic import atomic_write
from ..data import CTRData
from ..data.rows import as_tensor_rows
from ..metrics import roc_auc
from ..train import predict, scores
from ..train.manifest import CorruptArtifactError, check_fields
from .resume import _FINISHED_FORMAT, _FORMAT_VERSION, _read_json, _write_json
from .spec import ExperimentSpec

__all__ = ["ExperimentResult", "RunRecords"]


@dataclass
class ExperimentResult:
    """One record per model and seed, and each gated student's test-set gate weights per seed."""

    records: List[dict]
    gate_alphas: Dict[str, List[np.ndarray]] = field(default_factory=dict)
    # records loaded from an earlier run's finished units (resume), not trained by this one
    loaded: int = 0


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _infer_rate(model: torch.nn.Module, data: CTRData, batch_size: int) -> float:
    ids = as_tensor_rows(data.ids)
    predict(model, ids[:batch_size], batch_size)  # warm-up
    t0 = time.perf_counter()
    predict(model, ids, batch_size)
    return len(data) / (time.perf_counter() - t0)


class RunRecords:
    """One run's records (test metrics per model and seed), gate weights, the partial-results
    file, logging, and its units' finished records and checkpoint folders."""

    def __init__(self, test: CTRData, spec: ExperimentSpec, log, partial: Optional[Path],
                 checkpoint_dir: Optional[Path], resume: bool, run_ids: tuple,
                 on_finished: Optional[Callable[[ExperimentResult], None]]) -> None:
        self.test = test
        self.spec = spec
        self.log = log
        self.main = _dist.is_main_process()
        self.partial = partial if self.main else None  # rank 0 alone writes
        self.ckpt = checkpoint_dir
        self.resume = resume
        # finished records are written with the first id; on resume any of them is this run's
        self.run_id, self.run_ids = run_ids[0], run_ids
        self.on_finished = on_finished if self.main else None
        self.loaded = 0
        self.records: List[dict] = []
        self.gate_alphas: Dict[str, List[np.ndarray]] = {}
        self.segments = None
        if spec.segment_field is not None:
            if spec.segment_field not in test.field_names:
                raise ValueError(f"segment field {spec.segment_field!r} is not a field of the data "
                                 f"({', '.join(test.field_names)})")
            self.segments = test.ids[:, test.field_names.index(spec.segment_field)]

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
            rec["monitor"] = st.get("best_monitor")  # the best stopping value on the monitor rows
            rates = [h["samples_per_s"] for h in st["history"]]
            rec["train_samples_per_s"] = float(np.median(rates)) if rates else None
            times = [h["train_seconds"] for h in st["history"]]
            rec["epoch_seconds"] = round(float(np.median(times)), 3) if times else None
        if self.segments is not None:
            rec["segment_auc"] = self.segment_auc(logits)
        rec["seconds"] = round(seconds, 2)
        rec.update(extra)
        self.records.append(rec)
        self._write_partial()
        self._log_record(rec, f"({seconds:.0f}s)")
        return rec

    def _log_record(self, rec: dict, note: str) -> None:
        label = rec["model"] + (f" [{rec['variant']}]" if rec.get("variant") else "")
        self.log(f"  seed {rec['seed']}  {label:44s} AUC {rec['auc']:.4f}  logloss {rec['logloss']:.4f}  {note}")

    def _write_partial(self) -> None:
        if self.partial is not None:  # a long run keeps what it has finished if it is stopped
            _write_json(self.partial, self.records)

    # -- units: resumable pieces of the run ---------------------------------------------------
    def unit_dir(self, seed: int, name: str) -> Optional[Path]:
        """The checkpoint folder of unit ``name`` of ``seed`` (None without checkpoints)."""
        return None if self.ckpt is None else self.ckpt / f"seed{seed}" / name

    def _finished_path(self, seed: int, name: str) -> Path:
        return self.ckpt / f"seed{seed}" / f"{name}.finished.json"

    def finished(self, seed: int, name: str) -> Optional[dict]:
        """On resume, the finished record of unit ``name`` of ``seed``, its records and gate weights
        added to this run's (None: the unit is to be trained)."""
        if self.ckpt is None or not self.resume:
            return None
        path = self._finished_path(seed, name)
        if not path.is_file():
            return None
        done = _read_json(path)
        run = done.get("run") if done.get("run") in self.run_ids else self.run_id
        check_fields(path, {"format": _FINISHED_FORMAT, "format_version": _FORMAT_VERSION, "run": run},
                     done, keys=("format", "format_version", "run"), hint="written by another run")
        records, alphas = done.get("records"), done.get("alphas")
        if not (isinstance(records, list) and all(isinstance(r, dict) for r in records)
                and isinstance(alphas, list) and all(isinstance(a, list) and len(a) == 3 for a in alphas)):
            raise CorruptArtifactError(path, "corrupt", "its 'records' or 'alphas' field is missing or malformed")
        for label, fname, shape in alphas:
            f = path.parent / fname
            try:
                a = np.load(f)
            except (OSError, ValueError, EOFError) as e:
                raise CorruptArtifactError(f, "truncated" if isinstance(e, EOFError) else "corrupt",
                                           f"gate weights of {path.name} unreadable: {e}") from None
            if list(a.shape) != list(shape):
                raise CorruptArtifactError(f, "corrupt", f"shape {list(a.shape)}, {path.name} says {shape}")
            self.gate_alphas.setdefault(label, []).append(a)
        self.records += records
        self.loaded += len(records)
        self._write_partial()
        for rec in records:
            self._log_record(rec, "(finished earlier: loaded)")
        if self.on_finished is not None:
            self.on_finished(self.result())
        return done

    def finish(self, seed: int, name: str, first: int, alphas=(), keep: bool = False, **extra) -> None:
        """Unit ``name`` of ``seed`` is done: its records (``records[first:]``), gate weights
        ``alphas`` (``(label, array)`` pairs) and ``extra`` go to its finished record (rank 0); its
        checkpoints are deleted unless ``keep`` (a teacher set: until its seed is done)."""
        self._write_partial()  # records may have gained keys since record()
        if self.main and self.ckpt is not None:
            path = self._finished_path(seed, name)
            entries = []
            for i, (label, a) in enumerate(alphas):
                fname = f"{name}.alphas{i}.npy"
                atomic_write(path.parent / fname, lambda fh, a=a: np.save(fh, np.asarray(a)))
                entries.append([label, fname, list(np.shape(a))])
            _write_json(path, {"format": _FINISHED_FORMAT, "format_version": _FORMAT_VERSION, "run": self.run_id,
                               "unit": f"seed{seed}/{name}", "records": self.records[first:], "alphas": entries,
                               **extra})
            if not keep:
                shutil.rmtree(self.unit_dir(seed, name), ignore_errors=True)
        if self.on_finished is not None:
            self.on_finished(self.result())

    def seed_done(self, seed: int) -> None:
        """Delete the seed's remaining checkpoints (its teacher sets'); the finished records stay."""
        if self.main and self.ckpt is not None and (self.ckpt / f"seed{seed}").is_dir():
            for p in (self.ckpt / f"seed{seed}").iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

    def result(self) -> "ExperimentResult":
        return ExperimentResult(list(self.records), {k: list(v) for k, v in self.gate_alphas.items()}, self.loaded)

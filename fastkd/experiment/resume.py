"""The run folder of a resumable experiment: ``run.json`` (what a resumed run must share with the
run it continues), the JSON records beside it, and the checks ``--resume`` makes."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Union

from .. import distributed as _dist
from ..atomic import atomic_write_json
from ..data import CTRData
from ..train.manifest import (CorruptArtifactError, check_fields, data_fingerprint, read_json_object,
                              resume_config, state_digest)
from .spec import ExperimentSpec

__all__ = ["RUN_FILE", "WALL_FILE", "run_manifest", "run_id", "run_ids", "check_resume", "earlier_wall_seconds",
           "save_wall_seconds"]

RUN_FILE = "run.json"
# the wall time the run's processes have spent, up to each one's last finished unit (a resumed
# run's report adds the earlier processes' time to its own)
WALL_FILE = "wall.json"
_RUN_FORMAT, _FINISHED_FORMAT, _FORMAT_VERSION = "fastkd.run", "fastkd.finished", 1
# TrainConfig fields that never change a row's numbers (as for a checkpoint's manifest)
_FREE_CONFIG = ("progress", "eval_batch_size")
_RESUME_HINT = "--resume / resume=True continues only the same run; start afresh without it"
# spec settings added after format 1: written only when not at their default, so the run.json of a
# run started before them still matches
_LATER_SETTINGS = {"teacher_rows": "train", "student_dropout": None, "student_head_init": None, "hint_weight": 0.0,
                   "student_embed_init": None}
# what a resumed run may add to a finished one: seeds, and ablation rows after the saved ones
_GROWS = ("seeds", "ablations")
# run.json's record of the id that finished records written before ablations could be added carry
# (the digest of the manifest without seeds alone), kept when run.json is rewritten
LEGACY_ID = "legacy_run_id"


def run_manifest(spec: ExperimentSpec, train: CTRData, valid: CTRData, test: CTRData) -> dict:
    """What a resumed run must share with the run it continues (``run.json``): every setting of
    ``spec`` and its :class:`~fastkd.train.TrainConfig` (except ``progress`` and
    ``eval_batch_size``), and the fingerprints of the three splits' ids and labels. JSON values."""
    settings = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "config"
                and not (f.name in _LATER_SETTINGS and getattr(spec, f.name) == _LATER_SETTINGS[f.name])}
    cfg = resume_config(spec.config, free=_FREE_CONFIG)
    data = {name: data_fingerprint(d.ids, d.labels) for name, d in (("train", train), ("valid", valid),
                                                                     ("test", test))}
    out = {"format": _RUN_FORMAT, "format_version": _FORMAT_VERSION, **settings, "config": cfg, "data": data}
    return json.loads(json.dumps(out, default=repr))  # as it reads back from the file


_read_json = read_json_object  # run.json and the finished records, checked like every manifest


def run_id(manifest: dict) -> str:
    """The id a run's finished records carry: the digest of its manifest without ``seeds`` and
    ``ablations``, so a resumed run may add seeds and ablation rows (each seed's and row's records
    are its own) and still load the earlier ones."""
    return state_digest({k: v for k, v in manifest.items() if k not in _GROWS and k != LEGACY_ID})


def run_ids(manifest: dict) -> tuple:
    """The ids a resumed run's finished records may carry: :func:`run_id`, and for a run started
    before ablation rows could be added, the id its records were written with."""
    return (run_id(manifest),) + ((manifest[LEGACY_ID],) if manifest.get(LEGACY_ID) else ())


def _grows(old, new, key: str) -> bool:
    """Whether ``new`` extends the saved ``old`` value of ``key``: seeds in any order (each seed is
    its own), ablations only after the saved ones (a row's unit is named by its position)."""
    new = list(new)
    if not isinstance(old, list) or old == new:
        return False
    return all(s in new for s in old) if key == "seeds" else new[:len(old)] == old


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=1)


def check_resume(checkpoint_dir: Union[str, Path], spec: ExperimentSpec, train: CTRData, valid: CTRData,
                 test: CTRData) -> dict:
    """The run manifest of ``checkpoint_dir`` when it matches this run's (:func:`run_manifest`).

    ``spec.seeds`` may add seeds to the saved run's, and ``spec.ablations`` rows after the saved
    run's (its ``run.json`` is then rewritten with them): the finished units are loaded and the new
    seeds and rows trained.

    Raises ``FileNotFoundError`` when there is nothing to resume (no ``run.json``),
    :class:`~fastkd.train.manifest.ArtifactMismatchError` naming the first setting (``config.lr``,
    ``seeds``, ``model_kwargs.hidden_units``, ``data.train.ids``, ...) that differs, with both
    values, and :class:`~fastkd.train.manifest.CorruptArtifactError` for an unreadable file.
    """
    path = Path(checkpoint_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (no run with checkpoints there "
                                "started); run without --resume / resume=True")
    expected = run_manifest(spec, train, valid, test)
    found = _read_json(path)
    legacy = found.pop(LEGACY_ID, None) or state_digest({k: v for k, v in found.items() if k != "seeds"})
    # more seeds or rows than the saved run: the saved ones' records stay valid (run_id leaves them out)
    grown = {k: found[k] for k in _GROWS if _grows(found.get(k), expected[k], k)}
    hint = _RESUME_HINT
    if "student_dropout" in expected and "student_dropout" not in found:
        # the default changed (round 10): a run started before it used the teachers' dropout
        hint += "; a run started before the student-dropout candidates became the default resumes with " \
                "--student-dropout none (ExperimentSpec(student_dropout=None))"
    check_fields(path, {**expected, **grown}, found, hint=hint)
    expected[LEGACY_ID] = legacy
    if grown and _dist.is_main_process():
        _write_json(path, expected)
    return expected


def _start(checkpoint_dir: Path, manifest: dict, resume: bool) -> None:
    """A fresh run (rank 0): an earlier run's checkpoints and finished records go, then ``run.json``."""
    if resume or not _dist.is_main_process():
        return
    if checkpoint_dir.is_dir():
        for p in checkpoint_dir.iterdir():
            if p.name in (RUN_FILE, WALL_FILE) or (p.is_dir() and re.fullmatch(r"seed\d+", p.name)):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    _write_json(checkpoint_dir / RUN_FILE, manifest)


def earlier_wall_seconds(checkpoint_dir: Path) -> float:
    """The wall time the earlier processes of a resumed run spent up to their last finished unit
    (0 when none was saved; an unreadable file names itself)."""
    path = Path(checkpoint_dir) / WALL_FILE
    if not path.exists():
        return 0.0
    seconds = _read_json(path).get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise CorruptArtifactError(path, "corrupt", f"'seconds' must be a number >= 0, got {seconds!r}")
    return float(seconds)


def save_wall_seconds(checkpoint_dir: Path, seconds: float) -> None:
    """Record the run's wall time so far (rank 0, after every finished unit)."""
    atomic_write_json(Path(checkpoint_dir) / WALL_FILE, {"seconds": round(float(seconds), 3)})

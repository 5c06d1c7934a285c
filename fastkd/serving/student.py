"""The trained student's folder, ``<out>/student/`` of ``fastkd distill``: weights, model settings
and check rows in ``student.pt`` (:func:`save_student`, checked by :func:`load_student`), the
raw-row encoder beside it in ``encoder.json``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..data import CTRData
from ..models import CTRModel, build_model
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.evaluation import predict
from .raw_rows import ENCODER_FILE, RawRowEncoder

__all__ = ["save_student", "load_student", "SavedStudent", "STUDENT_DIR", "STUDENT_FILE", "CHECK_ROWS"]

STUDENT_DIR = "student"      # under a run's --out
STUDENT_FILE = "student.pt"
_ARTIFACT = "fastkd.student"
#: test rows kept with the weights (the first ones), for the checks of an export
CHECK_ROWS = 100_000


@dataclass
class SavedStudent:
    """What :func:`load_student` reads back.

    Attributes:
        model: the student, rebuilt and loaded, in eval mode.
        name: its :func:`~fastkd.models.build_model` name; ``model_kwargs`` its settings.
        info: what the run said about it (seed, distillation signal, test AUC, ...).
        check: the test rows kept with it (the first :data:`CHECK_ROWS` at most), or None.
        check_of: how many rows the split they come from had.
        check_logits: the student's logits on ``check`` when it was saved.
        encoder: the raw-row encoder of ``encoder.json`` beside it, or None (generated data).
        path: the ``student.pt`` read.
    """

    model: CTRModel
    name: str
    model_kwargs: Dict[str, Any]
    info: Dict[str, Any]
    check: Optional[CTRData]
    check_logits: Optional[torch.Tensor]
    check_of: int
    encoder: Optional[RawRowEncoder]
    path: Path = field(default=Path())


def save_student(folder: Union[str, Path], model: CTRModel, *, name: str, model_kwargs: Dict[str, Any],
                 check: Optional[CTRData] = None, info: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``folder/student.pt`` (atomically, with a checksummed manifest): the weights of
    ``model`` (built as ``build_model(name, field_sizes, **model_kwargs)``), its settings, ``info``,
    and the first :data:`CHECK_ROWS` rows of ``check`` with the model's logits on them. Returns the path."""
    if not isinstance(model, CTRModel):
        raise TypeError(f"expected a fastkd CTRModel, got {type(model).__name__}")
    state: Dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if check is not None:
        rows = check.subset(np.arange(min(len(check), CHECK_ROWS)))
        ids = torch.from_numpy(rows.ids)
        small = max(rows.field_sizes, default=0) < 2**31
        state["check"] = {"ids": ids.to(torch.int32) if small else ids, "labels": torch.from_numpy(rows.labels),
                          "logits": predict(model, rows).float(), "field_names": list(rows.field_names),
                          "of_rows": len(check)}
    state["settings"] = {"model": name, "field_sizes": list(model.field_sizes),
                         "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()},
                         "info": dict(info or {})}
    path = Path(folder) / STUDENT_FILE
    save_checkpoint(state, path, {"artifact": _ARTIFACT})
    return path


def load_student(source: Union[str, Path]) -> SavedStudent:
    """The student saved by :func:`save_student`, from a run folder (``--out`` of ``fastkd
    distill``), its ``student/`` folder or the ``student.pt`` file.

    Raises ``FileNotFoundError`` (saying why a run may have none),
    :class:`~fastkd.train.CorruptArtifactError` for a damaged file, ``ValueError`` for an
    ``encoder.json`` whose fields are not the student's.
    """
    src = Path(source)
    path = src if src.is_file() else next((p for p in (src / STUDENT_DIR / STUDENT_FILE, src / STUDENT_FILE)
                                           if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"no saved student in {src} (looked for {src / STUDENT_DIR / STUDENT_FILE} and {src / STUDENT_FILE}): "
            "`fastkd distill` saves the first seed's default student there when it finishes training it; a run with "
            "one teacher trains no student, and a run that has not got that far has none yet")
    obj = load_checkpoint(path, {"artifact": _ARTIFACT})  # whole, checksum right, a student's
    m = obj["settings"]
    model = build_model(m["model"], m["field_sizes"], **m["model_kwargs"])
    model.load_state_dict(obj["model"])
    model.eval()
    check = logits = None
    of = 0
    if "check" in obj:
        c = obj["check"]
        check = CTRData(c["ids"].numpy().astype(np.int64), c["labels"].numpy(), c["field_names"], m["field_sizes"])
        logits, of = c["logits"], int(c["of_rows"])
    encoder = None
    enc_path = path.parent / ENCODER_FILE
    if not enc_path.is_file() and m["info"].get("encoder_file"):
        raise FileNotFoundError(f"{enc_path} is missing: the run that saved {path} encoded raw values with it, "
                                "and without it the exported student could not serve raw rows")
    if enc_path.is_file():
        encoder = RawRowEncoder.load(enc_path)
        if encoder.field_sizes != list(m["field_sizes"]):
            raise ValueError(f"{enc_path}: its fields' sizes {encoder.field_sizes} are not those of the student in "
                             f"{path} ({list(m['field_sizes'])}): the two come from different runs")
    return SavedStudent(model, m["model"], dict(m["model_kwargs"]), dict(m["info"]), check, logits, of, encoder, path)

"""``fastkd export``'s work: a trained student -> TorchScript and ONNX files, its raw-row encoder
and ``serving.json``, each export checked against PyTorch on the same rows (:func:`export_student`)."""
from __future__ import annotations

import json

import platform
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_json
from ..data import CTRData
from ..data.encoder import FeatureEncoder
from ..models import CTRModel
from ..train.evaluation import predict
from . import _onnx
from .check import TOLERANCE, compare_logits
from .module import ServingModel
from .raw_rows import ENCODER_FILE, RawRowEncoder
from .student import load_student

__all__ = ["export_student", "FORMATS", "TORCHSCRIPT_FILE", "ONNX_FILE", "SERVING_FILE", "EXPORT_FILES"]

FORMATS = ("torchscript", "onnx")
TORCHSCRIPT_FILE, ONNX_FILE, SERVING_FILE = "student.torchscript.pt", "student.onnx", "serving.json"
# every file an export may write (the ONNX weights go to a .data file beside it when large)
EXPORT_FILES = (TORCHSCRIPT_FILE, ONNX_FILE, ONNX_FILE + ".data", ENCODER_FILE, SERVING_FILE)
_FORMAT, _FORMAT_VERSION = "fastkd.serving", 1
_RANDOM_ROWS = 1024


def _random_ids(field_sizes: Sequence[int], n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, s, n) for s in field_sizes], 1).astype(np.int64)


def export_torchscript(module: ServingModel, path: Path, example: torch.Tensor) -> None:
    """``torch.jit.trace`` of ``module`` (no Python control flow depends on the ids, so the trace
    is the model at any batch size), saved atomically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(module, (example,), check_trace=False)
        try:
            atomic_write(path, lambda fh: torch.jit.save(traced, fh))
        except RuntimeError as e:  # e.g. xDeepFM's CIN: a Python autograd.Function
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            raise ValueError(f"{type(module.model).__name__} cannot be saved as TorchScript ({first.strip()}); "
                             "export it as ONNX alone (formats=['onnx'], fastkd export --format onnx)") from None


def export_student(source: Union[str, Path, CTRModel], to: Union[str, Path], *,
                   formats: Sequence[str] = FORMATS, encoder: Union[None, RawRowEncoder, FeatureEncoder] = None,
                   check: Optional[CTRData] = None, name: Optional[str] = None) -> Dict[str, Any]:
    """Write a trained student for serving into the folder ``to`` and check every file written.

    Files: ``student.torchscript.pt`` (``torch.jit.load``), ``student.onnx`` (onnxruntime; a
    dynamic batch size), ``encoder.json`` (:meth:`RawRowEncoder.load`, raw values -> ids; when
    there is an encoder) and ``serving.json`` (input and output names, dtypes and shapes, the
    fields, the checks, versions). Both models map ids ``[B, F]`` int64 (input ``ids``) to
    logits ``[B]`` float32 (output ``logits``; ``sigmoid`` gives the click probability).

    Each file is read back and run on the check rows; its logits are compared with the PyTorch
    student's (``model(ids)`` in eval mode): the largest absolute difference and, with labels,
    both test AUCs go to ``serving.json``. A student loaded from a run is also compared with the
    logits it gave when the run saved it.

    Args:
        source: a run folder of ``fastkd distill`` (its ``student/``), that ``student/`` folder,
            its ``student.pt`` (:func:`~fastkd.serving.load_student`), or a trained
            :class:`~fastkd.models.CTRModel`.
        to: the output folder (created; files of the same names are replaced).
        formats: any of ``"torchscript"`` (needs nothing beyond torch) and ``"onnx"`` (needs
            ``fastkd[serving]``: an ``ImportError`` says so when absent).
        encoder: the raw-row encoder to ship (a bare :class:`~fastkd.data.FeatureEncoder` is taken
            with the ``token`` rule for every field); default: the saved run's, if any.
        check: rows to check on (ids and labels); default: the test rows saved with the student,
            else 1,024 random ids (no AUC).
        name: the model's name in ``serving.json`` (default: the saved one, or the class name).

    Returns:
        the contents of ``serving.json``.

    Raises:
        ValueError: an export differs from PyTorch by more than :data:`~fastkd.serving.check.TOLERANCE`
            (1e-5) on some logit (the files and ``serving.json`` are written first, so they can be looked at).
    """
    formats = list(dict.fromkeys([formats] if isinstance(formats, str) else formats))  # "onnx" alone, too
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown export format {bad[0] if bad else formats!r}; choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        _onnx.require_onnx()  # before anything is written
    info: Dict[str, Any] = {}
    saved_logits, check_of = None, 0
    if not isinstance(source, (CTRModel, str, Path)):
        raise TypeError(f"source must be a fastkd CTRModel or the path of a run / saved student, got "
                        f"{type(source).__name__} (a model of another library: export it with its own tools)")
    if isinstance(source, CTRModel):
        model, model_name = source, name or type(source).__name__.lower()
    else:
        saved = load_student(source)
        model, model_name, info = saved.model, name or saved.name, {"run": saved.info, "from": str(saved.path)}
        encoder = encoder if encoder is not None else saved.encoder
        if check is None and saved.check is not None:
            check, saved_logits, check_of = saved.check, saved.check_logits, saved.check_of
    if isinstance(encoder, FeatureEncoder):
        encoder = RawRowEncoder(encoder)
    sizes = list(model.field_sizes)
    if encoder is not None and encoder.field_sizes != sizes:
        raise ValueError(f"the encoder's field sizes {encoder.field_sizes} are not the model's {sizes}")
    if check is not None and list(check.field_sizes) != sizes:
        raise ValueError(f"the check rows' field sizes {check.field_sizes} are not the model's {sizes}")
    if encoder is not None and check is not None and list(encoder.field_names) != list(check.field_names):
        # same sizes, other columns (e.g. another run's encoder.json copied beside the student)
        raise ValueError(f"the encoder's fields {list(encoder.field_names)} are not the fields the student was "
                         f"trained on {list(check.field_names)}")

    model.eval()
    if check is not None and len(check):
        ids, labels = check.ids, check.labels
        what = (f"{len(check):,} rows given" if saved_logits is None else
                f"all {len(check):,} rows of the run's test split" if len(check) == check_of else
                f"the first {len(check):,} of the {check_of:,} rows of the run's test split")
    else:
        ids, labels, what = _random_ids(model.field_sizes, _RANDOM_ROWS), None, f"{_RANDOM_ROWS} random ids"
    ids_t = torch.from_numpy(ids)
    reference = predict(model, ids_t)
    checks: Dict[str, Any] = {"rows": what}
    if saved_logits is not None:
        checks["pytorch_vs_saved"] = compare_logits(saved_logits, reference)
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    _remove_earlier_export(to)
    serving = ServingModel(model)
    example = ids_t[: max(2, min(8, len(ids_t)))]
    files: Dict[str, Any] = {}
    if "torchscript" in formats:
        export_torchscript(serving, to / TORCHSCRIPT_FILE, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            loaded = torch.jit.load(str(to / TORCHSCRIPT_FILE))
        with torch.no_grad():
            z = torch.cat([loaded(ids_t[i:i + 16384]) for i in range(0, len(ids_t), 16384)])
        checks["torchscript"] = compare_logits(reference, z, labels)
        files["torchscript"] = TORCHSCRIPT_FILE
    if "onnx" in formats:
        meta = _onnx.export_onnx(serving, to / ONNX_FILE, example)
        import onnxruntime

        z = _onnx.run_onnx(_onnx.onnx_session(to / ONNX_FILE, threads=torch.get_num_threads()), ids)
        checks["onnx"] = {**compare_logits(reference, z, labels), "exporter": meta["exporter"],
                          "opset": meta["opset"], "onnxruntime": onnxruntime.__version__}
        files["onnx"] = meta["files"]
    if encoder is not None:
        encoder.save(to / ENCODER_FILE)
        files["encoder"] = ENCODER_FILE
    doc = {
        "format": _FORMAT, "format_version": _FORMAT_VERSION, "model": model_name,
        "field_names": encoder.field_names if encoder is not None else
        (list(check.field_names) if check is not None else [f"f{i}" for i in range(model.num_fields)]),
        "field_sizes": list(model.field_sizes),
        "input": {"name": _onnx.INPUT, "dtype": "int64", "shape": ["batch", model.num_fields]},
        "output": {"name": _onnx.OUTPUT, "dtype": "float32", "shape": ["batch"],
                   "meaning": "logit: sigmoid(logit) is the predicted click probability"},
        "files": files, "tolerance": TOLERANCE, "checks": checks, **info,
        "versions": {"fastkd": __import__("fastkd").__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    atomic_write_json(to / SERVING_FILE, doc, indent=1)
    off = [f"{k}: max |logit diff| {v['max_abs_diff']:.3g}" for k, v in checks.items()
           if isinstance(v, dict) and not v["within_tolerance"]]
    if off:
        raise ValueError(f"export to {to}: logits differ from PyTorch's by more than {TOLERANCE:g} "
                         f"({'; '.join(off)}; details in {to / SERVING_FILE})")
    return doc


def _remove_earlier_export(to: Path) -> None:
    """An earlier export's files go before this one writes: ``serving.json`` first (written last,
    it names the files of one complete export, so a folder without it is an interrupted export),
    then the model files and the encoder, so no file of another run or format stays beside
    the new ones."""
    earlier = to / SERVING_FILE
    named = []
    if earlier.is_file():
        try:
            files = json.loads(earlier.read_text()).get("files", {})
            named = [n for v in files.values() for n in ([v] if isinstance(v, str) else v)
                     if isinstance(n, str) and Path(n).name == n]
        except (ValueError, AttributeError, OSError):
            named = []
        earlier.unlink()
    for name in {*EXPORT_FILES, *named}:
        (to / name).unlink(missing_ok=True)

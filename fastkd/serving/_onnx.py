"""The optional ONNX side (``pip install 'fastkd[serving]'``: onnx, onnxruntime, onnxscript):
clear errors when it is absent, the export, and single-threaded CPU sessions."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch
from torch import nn

__all__ = ["onnx_missing", "require_onnx", "export_onnx", "onnx_session", "run_onnx", "INPUT", "OUTPUT"]

INPUT, OUTPUT = "ids", "logits"
_NEEDED = ("onnx", "onnxruntime", "onnxscript")
# above this many bytes of weights the graph and its weights go to two files (protobuf's 2 GB limit)
_ONE_FILE_BYTES = 1_500_000_000


def onnx_missing() -> str:
    """Empty when the ONNX side can run, else what is missing and how to install it."""
    import importlib.util

    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    return "" if not missing else (f"{', '.join(missing)} not installed (pip install 'fastkd[serving]', or "
                                   f"pip install {' '.join(_NEEDED)})")


def require_onnx() -> None:
    why = onnx_missing()
    if why:
        raise ImportError(f"ONNX export and onnxruntime need {', '.join(_NEEDED)}: {why}")


@contextlib.contextmanager
def _quiet():
    """torch.onnx's progress lines, its registry's notes on absent torchvision ops and its
    deprecation warnings are not the user's business."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(module: nn.Module, path: Union[str, Path], example: torch.Tensor) -> Dict[str, object]:
    """Export ``module`` (ids ``[B, F]`` -> logits ``[B]``) to ``path`` with a dynamic batch size:
    ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript's translation). Written
    into a temporary folder beside ``path``, then renamed into place (``path`` alone, or with
    ``path.data`` for weights over 1.5 GB). Returns ``{"exporter", "opset", "files"}``."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > _ONE_FILE_BYTES
    with _quiet():
        program = torch.onnx.export(module, (example,), None, dynamo=True, verbose=False, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},))
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    with tempfile.TemporaryDirectory(prefix=path.name + ".", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        with _quiet():
            program.save(str(staged), external_data=big)
        files = sorted(p.name for p in Path(tmp).iterdir())
        for name in files:
            os.replace(Path(tmp) / name, path.parent / name)
    return {"exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", "opset": opset,
            "files": files}


def onnx_session(path: Union[str, Path], threads: int = 1):
    """An onnxruntime CPU session of ``path`` on ``threads`` threads (one op at a time)."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session, ids: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Logits of ``session`` for ``ids`` ``[N, F]``, in batches."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = [session.run(None, {INPUT: ids[i:i + batch_size]})[0] for i in range(0, len(ids), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)

"""What serving costs: the student against the teacher ensemble, p50/p99 latency of one call and
samples/s at each batch size, in PyTorch (eager, eval, no_grad) and onnxruntime, on CPU threads
fixed for the measurement (:func:`serving_benchmark`)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data import CTRData
from ..models import CTRModel
from ..train.evaluation import predict
from . import _onnx
from .check import compare_logits
from .module import EnsembleModel, ServingModel

__all__ = ["serving_benchmark", "time_calls"]

_DISTINCT_BATCHES = 8  # inputs cycled through, so no call sees the cache state of the same rows twice in a row


def time_calls(call: Callable[[Any], Any], inputs: Sequence[Any], batch: int, *, budget_s: float,
               min_calls: int = 20, max_calls: int = 1000, warmup: int = 3) -> Dict[str, float]:
    """Time ``call(x)`` one call at a time over ``inputs`` (cycled): at least ``min_calls`` calls,
    then more until ``budget_s`` seconds have passed (``max_calls`` at most), after ``warmup``
    untimed ones. Returns ``{"calls", "p50_ms", "p99_ms", "samples_per_s"}``, samples/s being
    ``batch * calls / time of the calls``."""
    for i in range(warmup):
        call(inputs[i % len(inputs)])
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < budget_s):
        x = inputs[len(times) % len(inputs)]
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    t = np.asarray(times)
    return {"calls": int(t.size), "p50_ms": float(np.percentile(t, 50) * 1e3),
            "p99_ms": float(np.percentile(t, 99) * 1e3), "samples_per_s": float(batch * t.size / t.sum())}


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def serving_benchmark(student: CTRModel, teachers: Sequence[CTRModel], data: CTRData, *,
                      batch_sizes: Sequence[int] = (1, 256), threads: int = 1, budget_s: float = 0.15,
                      onnx: Optional[bool] = None, student_label: str = "student",
                      ensemble_label: Optional[str] = None, seed: int = 0) -> Dict[str, Any]:
    """Serving cost of ``student`` and of the mean ensemble of ``teachers`` on rows of ``data``.

    PyTorch: :class:`~fastkd.serving.ServingModel` / :class:`~fastkd.serving.EnsembleModel`
    (the sum of the teachers' forward passes), eval, ``torch.no_grad``, ``threads`` torch threads
    (restored after). onnxruntime (``onnx=None``: when installed): the student exported as
    ``fastkd export`` does, a CPU session of ``threads`` threads; and its check on all of ``data``:
    max |ONNX logit - PyTorch logit| and both AUCs (:func:`~fastkd.serving.compare_logits`).
    Each batch is ``batch`` rows drawn from ``data`` (seeded); each cell is timed for about
    ``budget_s`` seconds (:func:`time_calls`), so the whole costs a few seconds.

    Returns:
        ``{"threads", "budget_s", "rows": [{"model", "role", "runtime", "batch", "params", "calls",
        "p50_ms", "p99_ms", "samples_per_s"}, ...], "onnx_check": {...} | None, "onnx_skipped": str,
        "seconds"}``.
    """
    t_all = time.perf_counter()
    ids = data.ids
    rng = np.random.default_rng(seed)
    inputs = {b: [np.ascontiguousarray(ids[rng.integers(0, len(ids), b)]) for _ in range(_DISTINCT_BATCHES)]
              for b in batch_sizes}
    ens_label = ensemble_label or f"ensemble of {len(teachers)} teachers (mean)"
    modes = [m.training for m in (student, *teachers)]
    models = [(student_label, "student", ServingModel(student)), (ens_label, "ensemble", EnsembleModel(teachers))]
    rows: List[Dict[str, Any]] = []
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: Dict[str, Any] = {"threads": threads, "budget_s": budget_s, "rows": rows, "onnx_check": None,
                           "onnx_skipped": ""}
    try:
        with torch.no_grad():
            for label, role, module in models:
                for b in batch_sizes:
                    xs = [torch.from_numpy(x) for x in inputs[b]]
                    rows.append({"model": label, "role": role, "runtime": "pytorch", "batch": b,
                                 "params": _params(module), **time_calls(module, xs, b, budget_s=budget_s)})
        why = _onnx.onnx_missing() if onnx in (None, True) else "not asked for"
        if why and onnx:
            _onnx.require_onnx()
        out["onnx_skipped"] = why
        if not why:
            try:
                _onnx_rows(out, student, models[0][2], data, inputs, threads, budget_s, student_label)
            except Exception as e:  # a long run is not lost to the measurement: the report says what failed
                first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
                out["onnx_skipped"] = f"the ONNX export or run failed ({type(e).__name__}: {first[:200]})"
                out["onnx_check"] = None
                del rows[len(models) * len(batch_sizes):]
    finally:
        torch.set_num_threads(old_threads)
        for m, mode in zip((student, *teachers), modes):
            m.train(mode)
    out["seconds"] = round(time.perf_counter() - t_all, 2)
    return out


def _onnx_rows(out, student, served, data, inputs, threads, budget_s, student_label) -> None:
    """The student in onnxruntime: its check on all of ``data`` and its timed rows, into ``out``."""
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="fastkd-serving-") as tmp:
        path = Path(tmp) / "student.onnx"
        meta = _onnx.export_onnx(served, path, torch.from_numpy(data.ids[:8]))
        session = _onnx.onnx_session(path, threads=threads)
        check = compare_logits(predict(student, data), _onnx.run_onnx(session, data.ids), data.labels)
        out["onnx_check"] = {**check, "exporter": meta["exporter"], "opset": meta["opset"],
                             "onnxruntime": onnxruntime.__version__}
        for b, xs in inputs.items():
            out["rows"].append({"model": student_label, "role": "student", "runtime": "onnxruntime", "batch": b,
                                "params": _params(student),
                                **time_calls(lambda x: session.run(None, {_onnx.INPUT: x}), xs, b,
                                             budget_s=budget_s)})

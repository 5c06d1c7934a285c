"""Serving the student, one job per module:

| module | job |
|---|---|
| ``module`` | :class:`ServingModel` (ids -> logits in plain torch ops, exportable), :class:`EnsembleModel` |
| ``raw_rows`` | :class:`RawRowEncoder`: raw field values -> ids, as the data files were encoded; ``encoder.json`` |
| ``student`` | :func:`save_student` / :func:`load_student`: a run's ``student/`` folder |
| ``check`` | :func:`compare_logits`: an export against PyTorch (max abs logit difference, AUCs) |
| ``_onnx`` | the optional ONNX side: export, onnxruntime sessions, what is missing |
| ``export`` | :func:`export_student` (``fastkd export``): TorchScript, ONNX, encoder, ``serving.json`` |
| ``latency`` | :func:`serving_benchmark`: student vs teacher ensemble, p50/p99 latency, samples/s |

TorchScript needs nothing beyond torch; ONNX needs ``pip install 'fastkd[serving]'``.
"""
from .check import TOLERANCE, compare_logits
from .export import FORMATS, export_student
from .latency import serving_benchmark
from .module import EnsembleModel, ServingModel
from .raw_rows import RawRowEncoder, field_rules
from .student import STUDENT_DIR, SavedStudent, load_student, save_student

__all__ = ["ServingModel", "EnsembleModel", "RawRowEncoder", "field_rules", "save_student", "load_student",
           "SavedStudent", "STUDENT_DIR", "export_student", "FORMATS", "compare_logits", "TOLERANCE",
           "serving_benchmark"]

"""Training, one job per module:

| module | job |
|---|---|
| ``config`` | :class:`TrainConfig`: optimisation and stopping settings, the validation cut |
| ``early_stopping`` | :class:`EarlyStopper`: the best epoch of the monitored value and its weights |
| ``evaluation`` | :func:`predict`, :func:`evaluate`: logits and metrics, gathered over ranks |
| ``checkpoint`` | :func:`atomic_save`, checkpoints checked against their manifest |
| ``manifest`` | artifact manifests and their errors (:class:`ArtifactMismatchError`, ...) |
| ``loop`` | :func:`train_model` and the epoch loop students share (DDP, resume, stopping) |
| ``teacher_cache`` | :class:`TeacherCache`: teachers' outputs per row, in memory or memory-mapped |
| ``teachers`` | :func:`train_teachers` (optionally cross-fitted), ``TeacherSet``, ``FoldAverage`` |
| ``distiller`` | :class:`Distiller`: teachers → cache → ensemble signal → student |

Every name here was importable from ``fastkd.train`` before it became a package, and still is.
"""
from .checkpoint import atomic_save
from .config import MONITORS, TrainConfig, seed_everything
from .early_stopping import EarlyStopper
from .evaluation import evaluate, predict, scores
from .loop import train_model
from .manifest import ArtifactError, ArtifactMismatchError, CorruptArtifactError
from .teacher_cache import TeacherCache
from .teachers import TeacherSet, train_teachers
from .distiller import Distiller  # noqa: E402  (last: it uses all of the above)

__all__ = [
    "TrainConfig", "EarlyStopper", "MONITORS", "seed_everything", "atomic_save", "predict", "scores", "evaluate",
    "train_model", "ArtifactError", "ArtifactMismatchError", "CorruptArtifactError", "TeacherCache", "TeacherSet", "train_teachers", "Distiller",
]

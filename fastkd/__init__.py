"""fastkd: exact, fast ensemble knowledge distillation for CTR prediction in PyTorch.

Public names::

    from fastkd import DistillLoss, GatedDistillLoss, HintLoss
    from fastkd.functional import distill_loss, gated_distill_loss, hint_loss

Importing fastkd never touches CUDA.
"""
from .version import __version__
from .losses import DistillLoss, GatedDistillLoss, HintLoss
from . import functional

__all__ = [
    "__version__",
    "DistillLoss",
    "GatedDistillLoss",
    "HintLoss",
    "MultiFieldEmbedding",
    "Distiller",
    "TeacherCache",
    "TrainConfig",
    "FeatureHasher",
    "functional",
]

# Heavier parts load on first use, so `import fastkd` stays cheap for users who only want the losses.
_LAZY = {
    "MultiFieldEmbedding": ("fastkd.embedding", "MultiFieldEmbedding"),
    "Distiller": ("fastkd.train.distiller", "Distiller"),
    "TeacherCache": ("fastkd.train.teacher_cache", "TeacherCache"),
    "TrainConfig": ("fastkd.train.config", "TrainConfig"),
    "FeatureHasher": ("fastkd.hashing", "FeatureHasher"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")

"""Distillation inside the training loops people already run, each with a few lines of glue.

- :class:`TeacherLogitsDataset`: any map-style dataset plus each row's teacher logits, by sample
  index, so any ``DataLoader`` (shuffled, any batch size, workers) yields them aligned.
- :mod:`fastkd.integration.deepctr`: a DeepCTR-Torch model trained by its own ``fit``.
- :mod:`fastkd.integration.fuxictr`: a FuxiCTR ``BaseModel`` trained by its own ``fit``.

None of them imports DeepCTR-Torch or FuxiCTR: the adapters work on the models and loaders they
are given, so ``import fastkd.integration.*`` costs nothing where those packages are absent.
Examples and measurements: ``docs/integration.md``.
"""
from .dataset import TeacherLogitsDataset

__all__ = ["TeacherLogitsDataset"]

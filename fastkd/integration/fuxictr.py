"""FuxiCTR (tested with 2.3.10): a ``BaseModel`` student distilled through its own ``fit``.

::

    kd = attach(student, teacher_logits, GatedDistillLoss(3, student_outputs="prob"))
    student.fit(kd.loader(train_gen), epochs=10, validation_data=valid_gen)

What :func:`attach` handles:

- **Probabilities.** A ``binary_classification`` model ends in a sigmoid (baked into its layers
  when it is built, so it cannot simply be switched off); the loss must say
  ``student_outputs="prob"`` (checked) and converts them exactly to logits. ``evaluate`` and
  ``predict`` stay probabilities.
- **Teacher logits by sample index.** FuxiCTR's dict batches carry no row index and
  ``add_loss`` never sees the batch. Two ways in: :meth:`FuxiCTRDistillation.loader` rebuilds a
  map-style loader (``NpzDataLoader``) over :class:`~fastkd.integration.TeacherLogitsDataset`, so
  each batch brings its teacher logits under ``"fastkd_teacher_logits"``; or, for any loader
  (Parquet/Ray too), the data has a ``meta`` column ``"fastkd_row"`` holding each training row's
  index (FuxiCTR's feature config: ``{"name": "fastkd_row", "type": "meta", "dtype": "int",
  "remap": False, "active": True}``). The model's ``train_step`` takes those keys off the batch
  and ``add_loss`` reads them; ``evaluate`` and ``predict`` are untouched.
- **Frozen teachers.** Teacher logits are computed once (:func:`teacher_logits`: FuxiCTR
  teachers in eval mode, no gradients) or come from a :class:`~fastkd.TeacherCache`; no teacher
  is in the student's module tree, so FuxiCTR's ``train()`` each epoch never reaches them.
- **The gate is trained and saved.** The loss module becomes ``student.fastkd_loss``: its
  parameters are added to the optimizer the model built in its constructor (so FuxiCTR's
  learning-rate decay and gradient clipping apply to them) and are in ``state_dict()``, which
  FuxiCTR's best-model checkpoint saves and ``fit`` reloads at the end. A ``net_regularizer``
  applies to them as to every non-embedding weight. :meth:`FuxiCTRDistillation.remove`
  restores the plain model.
"""
from __future__ import annotations

import types
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ._common import check_outputs_kind, join_student, leave_student, probs_to_logits, teacher_rows
from .dataset import TeacherLogitsDataset

__all__ = ["attach", "teacher_logits", "FuxiCTRDistillation", "ROW_KEY", "LOGITS_KEY"]

ROW_KEY = "fastkd_row"  # the meta column with each training row's index
LOGITS_KEY = "fastkd_teacher_logits"  # the batch key kd.loader() adds


def _check_model(model) -> None:
    for attr in ("train_step", "add_loss", "forward", "feature_map", "output_activation"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a FuxiCTR model (fuxictr.pytorch.models.BaseModel); "
                            f"{type(model).__name__} has no {attr!r}")


def _outputs_probabilities(model) -> bool:
    return isinstance(model.output_activation, nn.Sigmoid)


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in (ROW_KEY, LOGITS_KEY)}


def _map_style(loader) -> bool:
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, torch.utils.data.IterableDataset)


def _sequential(loader) -> bool:
    if isinstance(loader, DataLoader):
        return not isinstance(loader.sampler, RandomSampler)
    return not getattr(loader, "shuffle", False)


def teacher_logits(teachers: Sequence[nn.Module], data_generator, *, num_samples: Optional[int] = None) -> torch.Tensor:
    """Each FuxiCTR teacher's logits on the student's training data, once.

    ``data_generator`` yields the training batches. A torch ``DataLoader`` over a map-style
    dataset (``NpzDataLoader``) is read once in row order, shuffled or not; other loaders need a
    ``"fastkd_row"`` column (each batch is placed at its rows) or must not shuffle (row i is the
    i-th sample they yield). Teachers run in eval mode without gradients and stay in eval mode.
    Sigmoid outputs (``binary_classification``) are converted exactly to logits after clamping
    to [1e-7, 1 − 1e-7]; ``regression`` teachers output logits already.

    Shape:
        - output: float32 [N, M], N = the loader's ``num_samples`` (or ``num_samples=``)
    """
    if len(teachers) == 0:
        raise ValueError("teachers is empty")
    for t in teachers:
        _check_model(t)
        t.eval()
    if _map_style(data_generator):  # one pass in row order, whatever the loader's shuffling
        data_generator = DataLoader(data_generator.dataset, batch_size=data_generator.batch_size, shuffle=False,
                                    num_workers=data_generator.num_workers, collate_fn=data_generator.collate_fn)
        if num_samples is None:
            num_samples = len(data_generator.dataset)
    n = num_samples if num_samples is not None else getattr(data_generator, "num_samples", None)
    if n is None:
        raise ValueError("pass num_samples=: the loader does not say how many samples it holds")
    out = torch.full((n, len(teachers)), float("nan"))
    seen = torch.zeros(n, dtype=torch.bool)
    start = 0
    with torch.no_grad():
        for batch in data_generator:
            if ROW_KEY in batch:
                rows = batch[ROW_KEY].reshape(-1).long()
            elif _sequential(data_generator):
                b = len(next(iter(batch.values())))
                rows = torch.arange(start, start + b)
                start += b
            else:
                raise ValueError(f"the loader shuffles and its batches have no {ROW_KEY!r} column: rows unknown")
            inputs = _model_inputs(batch)
            for j, t in enumerate(teachers):
                y = t.forward(inputs)["y_pred"].reshape(-1).cpu()
                out[rows, j] = probs_to_logits(y) if _outputs_probabilities(t) else y.float()
            seen[rows] = True
    if not bool(seen.all()):
        raise ValueError(f"{int((~seen).sum())} of {n} rows never came out of the loader")
    return out


class FuxiCTRDistillation:
    """The link between a FuxiCTR model and a fastkd loss; made by :func:`attach`.

    Replaces, on this model instance only, ``train_step`` (which now takes the batch's teacher
    logits or row indices off the batch) and ``add_loss`` (``criterion(y_pred, teacher logits,
    y_true)``); ``fit``, ``evaluate``, ``predict``, checkpoints are FuxiCTR's.
    """

    def __init__(self, model, teacher_logits, criterion: nn.Module) -> None:
        _check_model(model)
        if not hasattr(model, "optimizer"):
            raise ValueError("the model has no optimizer: call model.compile(...) before attach()")
        check_outputs_kind(criterion, _outputs_probabilities(model), "this FuxiCTR model")
        self.model = model
        self.criterion = criterion
        self.teacher = teacher_rows(teacher_logits)
        self._batch_teacher: Optional[torch.Tensor] = None
        join_student(model, criterion, model.optimizer, model.device)
        model.train_step = types.MethodType(_train_step, model)
        model.add_loss = types.MethodType(_add_loss, model)
        model._fastkd = self

    def loader(self, data_generator, **overrides) -> DataLoader:
        """``data_generator`` (a torch ``DataLoader`` over a map-style dataset, e.g. FuxiCTR's
        ``NpzDataLoader``) rebuilt so that each batch also carries its teacher logits; same batch
        size, shuffling, workers and collate (``overrides`` go to the new ``DataLoader``)."""
        if not _map_style(data_generator):
            raise TypeError(f"loader() rebuilds torch DataLoaders over map-style datasets (NpzDataLoader); for "
                            f"{type(data_generator).__name__} give the data a meta column {ROW_KEY!r} with each "
                            f"row's index instead")
        kw = dict(batch_size=data_generator.batch_size, shuffle=isinstance(data_generator.sampler, RandomSampler),
                  num_workers=data_generator.num_workers, drop_last=data_generator.drop_last,
                  collate_fn=_Collate(data_generator.collate_fn))
        kw.update(overrides)
        return DataLoader(TeacherLogitsDataset(data_generator.dataset, self.teacher), **kw)

    def __getstate__(self):
        state = dict(self.__dict__)  # a pickled model keeps no (possibly memory-mapped) teacher logits
        state["teacher"], state["_batch_teacher"] = None, None
        return state

    def remove(self) -> None:
        """Detach: the model's own ``train_step``/``add_loss`` come back and ``fastkd_loss``
        leaves its module tree, state_dict and optimizer."""
        for name in ("train_step", "add_loss", "_fastkd"):
            self.model.__dict__.pop(name, None)
        leave_student(self.model, self.model.optimizer)


class _Collate:
    """The loader's own collate on the samples, then their teacher logits stacked under LOGITS_KEY."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, batch):
        samples, logits = zip(*batch)
        out = self.collate(list(samples)) if self.collate is not None else torch.utils.data.default_collate(
            list(samples))
        out[LOGITS_KEY] = torch.stack(logits)
        return out


def _train_step(model, batch_data):
    kd: FuxiCTRDistillation = model._fastkd
    t = batch_data.get(LOGITS_KEY)
    if t is None:
        if ROW_KEY not in batch_data:
            raise RuntimeError(f"this batch carries neither teacher logits ({LOGITS_KEY!r}: train on kd.loader(...)) "
                               f"nor row indices (a meta column {ROW_KEY!r})")
        if kd.teacher is None:
            raise RuntimeError("no teacher logits")
        t = kd.teacher[batch_data[ROW_KEY].reshape(-1).long().cpu()]
    # FuxiCTR's get_inputs skips meta columns but fails on keys its feature map lacks
    drop = (LOGITS_KEY,) if ROW_KEY in model.feature_map.features else (LOGITS_KEY, ROW_KEY)
    kd._batch_teacher = t.to(model.device)
    try:
        return type(model).train_step(model, {k: v for k, v in batch_data.items() if k not in drop})
    finally:
        kd._batch_teacher = None


def _add_loss(model, return_dict, y_true):
    kd: FuxiCTRDistillation = model._fastkd
    if kd._batch_teacher is None:
        raise RuntimeError("add_loss called outside train_step: no teacher logits for this batch")
    return kd.criterion(return_dict["y_pred"], kd._batch_teacher, y_true)


def attach(model, teacher_logits, criterion: nn.Module) -> FuxiCTRDistillation:
    """Distil into the FuxiCTR ``model`` through its own ``fit``.

    Args:
        model: a FuxiCTR ``BaseModel`` (built, so compiled).
        teacher_logits: a :class:`~fastkd.TeacherCache` or float tensor/array [N, M]: row i holds
            the teachers' logits for the training data's row i.
        criterion: a fastkd loss module, e.g. ``GatedDistillLoss(M, student_outputs="prob")``.

    Returns:
        the :class:`FuxiCTRDistillation`; train with ``model.fit(kd.loader(train_gen), ...)``
        (or on a loader whose batches have the ``"fastkd_row"`` meta column).
    """
    return FuxiCTRDistillation(model, teacher_logits, criterion)

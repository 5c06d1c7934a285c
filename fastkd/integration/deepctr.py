"""DeepCTR-Torch (tested with 0.3.0): a student distilled through the model's own ``compile``/``fit``.

::

    student.compile("adam", "binary_crossentropy", metrics=["auc"])           # as usual
    kd = attach(student, teacher_logits, GatedDistillLoss(3, student_outputs="prob"))
    student.fit(kd.inputs(x), y, batch_size=2048, epochs=10, validation_data=(x_val, y_val))

What :func:`attach` handles:

- **Probabilities.** A binary DeepCTR model ends in a sigmoid; the loss must say
  ``student_outputs="prob"`` (checked), and converts them exactly to logits. A model built with
  ``task="regression"`` (no sigmoid) needs ``"logit"``. Predictions and DeepCTR's metrics stay
  probabilities.
- **Teacher logits by sample index.** ``fit(x, y)`` batches carry no row index, and teacher
  logits packed into ``y`` break DeepCTR's metrics. :meth:`DeepCTRDistillation.inputs` appends
  two integer columns holding each row's index (exact in DeepCTR's float32 batches up to 2**44
  rows); a forward pre-hook strips them before the model sees its inputs and the loss reads
  the batch's teacher logits by those rows. ``y`` stays the labels.
- **Frozen teachers.** The teachers' logits come from a :class:`~fastkd.TeacherCache` or a
  tensor [N, M] computed once (:func:`teacher_logits` runs DeepCTR teachers in eval mode, without
  gradients); no teacher joins the student's module tree.
- **The gate is trained and saved.** The loss module becomes ``student.fastkd_loss``: its
  parameters join the optimizer ``compile`` built, and ``state_dict()`` — so DeepCTR's
  ``ModelCheckpoint`` and ``EarlyStopping(restore_best_weights=True)`` carry the gate.
  :meth:`DeepCTRDistillation.remove` restores the plain model for serving.
- **Training mode.** DeepCTR-Torch 0.3.0's ``fit`` leaves the model in eval mode after its first
  validation pass; the pre-hook puts it back in training mode for every training batch (row
  columns present, autograd on), so dropout and BatchNorm train in every epoch
  (``attach(..., train_mode=False)`` keeps DeepCTR's behaviour). :func:`lr_decay_on_plateau` is
  fastkd's learning-rate rule as a DeepCTR callback.
- **The loss reduction** follows DeepCTR's call (``reduction="sum"`` in its ``fit``), so the
  L2 terms DeepCTR adds keep their usual weight against the data term.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._common import check_outputs_kind, join_student, leave_student, num_rows, probs_to_logits, teacher_rows

__all__ = ["attach", "teacher_logits", "lr_decay_on_plateau", "DeepCTRDistillation", "ROW_BASE"]

#: the row index travels as two integer columns (row // ROW_BASE, row % ROW_BASE), each exact in
#: the float32 tensors DeepCTR-Torch makes of its inputs (< 2**24)
ROW_BASE = 2 ** 20
_MAX_ROWS = ROW_BASE * 2 ** 24


def row_columns(rows: np.ndarray) -> np.ndarray:
    """Row indices [n] → the two int64 columns [n, 2] appended to DeepCTR's inputs."""
    return np.stack([rows // ROW_BASE, rows % ROW_BASE], 1)


def rows_of(columns: torch.Tensor) -> torch.Tensor:
    """The two columns, as DeepCTR's float32 batch holds them → int64 row indices [B]."""
    r = columns.long()
    return r[:, 0] * ROW_BASE + r[:, 1]


def _check_model(model) -> None:
    for attr in ("feature_index", "fit", "predict", "out"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a DeepCTR-Torch model (deepctr_torch.models.basemodel.BaseModel); "
                            f"{type(model).__name__} has no {attr!r}")


def _outputs_probabilities(model) -> bool:
    task = getattr(model.out, "task", "binary")
    if task == "multiclass":
        raise ValueError("DeepCTR task='multiclass' is not supported: the adapter distils binary CTR models")
    return task == "binary"


def teacher_logits(teachers: Sequence[nn.Module], x, batch_size: int = 16384) -> torch.Tensor:
    """Each DeepCTR-Torch teacher's logits on ``x`` (the student's training inputs, in order), once.

    Runs ``teacher.predict`` (eval mode, no gradients; the teachers stay in eval mode and out of
    any student). Binary teachers output sigmoid probabilities, which are converted exactly to
    logits after clamping to [1e-7, 1 − 1e-7] (as ``teacher_outputs="prob"`` would);
    ``task="regression"`` teachers output logits already.

    Shape:
        - output: float32 [N, M], M = ``len(teachers)``
    """
    if len(teachers) == 0:
        raise ValueError("teachers is empty")
    cols = []
    for i, t in enumerate(teachers):
        _check_model(t)
        p = np.asarray(t.predict(x, batch_size)).reshape(-1)
        cols.append(probs_to_logits(p) if _outputs_probabilities(t) else torch.from_numpy(p).float())
    return torch.stack(cols, 1)


class DeepCTRDistillation:
    """The link between a compiled DeepCTR-Torch model and a fastkd loss; made by :func:`attach`.

    Once attached, ``model.loss_func`` is this object: DeepCTR's ``fit`` calls it as
    ``loss_func(y_pred, y, reduction="sum")``; it reads the batch's rows (left by the forward
    pre-hook) and returns ``criterion(y_pred, teacher_logits[rows], y)``, times the batch size
    when DeepCTR asks for a sum of a mean-reduced loss.
    """

    def __init__(self, model, teacher_logits, criterion: nn.Module, train_mode: bool = True) -> None:
        _check_model(model)
        self.train_mode = train_mode
        if not hasattr(model, "optim"):
            raise ValueError("call model.compile(...) before attach(): attach adds the gate to its optimizer "
                             "and replaces its loss")
        if getattr(model, "gpus", None):
            raise NotImplementedError("DeepCTR's multi-GPU DataParallel (gpus=...) is not supported by the adapter")
        check_outputs_kind(criterion, _outputs_probabilities(model), "this DeepCTR model")
        self.model = model
        self.criterion = criterion
        self.teacher = teacher_rows(teacher_logits)
        if num_rows(self.teacher) > _MAX_ROWS:
            raise ValueError(f"at most {_MAX_ROWS} rows")
        self.num_columns = max(end for _, end in model.feature_index.values())
        self._base_loss = model.loss_func
        self._rows: Optional[torch.Tensor] = None
        join_student(model, criterion, model.optim, model.device)
        model.loss_func = self
        self._hook = model.register_forward_pre_hook(self._strip_rows)

    # -- the user's side ------------------------------------------------------------------------
    def inputs(self, x) -> list:
        """``x`` (a dict of feature arrays, as ``fit`` takes, or a list in ``feature_index``
        order) as a list with the two row-index columns appended; pass it to ``fit``."""
        if isinstance(x, dict):
            missing = [f for f in self.model.feature_index if f not in x]
            if missing:
                raise ValueError(f"x lacks the model's features {missing}")
            x = [x[f] for f in self.model.feature_index]
        elif isinstance(x, np.ndarray):
            x = [x]
        x = [np.asarray(a) for a in x]
        n = len(x[0])
        if n != num_rows(self.teacher):
            raise ValueError(f"x has {n} rows but teacher_logits has {num_rows(self.teacher)}: row i of each "
                             f"must be the same sample")
        return x + [row_columns(np.arange(n, dtype=np.int64))]

    def remove(self) -> None:
        """Detach: the model gets its compiled loss back, loses ``fastkd_loss`` (from its module
        tree, state_dict and optimizer) and the hook; call it before exporting the student."""
        self._hook.remove()
        if self.model.loss_func is self:
            self.model.loss_func = self._base_loss
        leave_student(self.model, self.model.optim)

    # -- DeepCTR's side -------------------------------------------------------------------------
    def _strip_rows(self, module, args):
        X = args[0]
        if X.dim() == 2 and X.shape[1] == self.num_columns + 2:
            if self.model.loss_func is not self:
                raise RuntimeError("model.loss_func was replaced after attach() (a later compile()?): "
                                   "compile first, then attach")
            if self.train_mode and torch.is_grad_enabled() and not module.training:
                # DeepCTR-Torch 0.3.0's fit leaves the model in eval mode after its first validation
                # pass (predict() calls eval(), fit never calls train() again): later epochs would
                # train without dropout and with frozen BatchNorm statistics. A batch with row
                # columns under autograd is a training batch, so it trains in training mode.
                module.train()
            self._rows = rows_of(X[:, -2:])
            return (X[:, : self.num_columns],) + tuple(args[1:])
        self._rows = None
        return None

    def __call__(self, y_pred: torch.Tensor, y_true: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        rows, self._rows = self._rows, None
        if rows is None:
            raise RuntimeError("this batch carries no row index: train with fit(kd.inputs(x), y, ...)")
        if self.teacher is None:
            raise RuntimeError("the teacher logits are not kept when the model is pickled: attach again")
        if rows.shape[0] != y_pred.shape[0]:
            raise RuntimeError(f"{rows.shape[0]} row indices for a batch of {y_pred.shape[0]} predictions")
        t = self.teacher[rows.cpu()].to(y_pred.device)
        loss = self.criterion(y_pred, t, y_true)
        if reduction == "sum" and self.criterion.reduction == "mean":
            loss = loss * y_pred.shape[0]
        elif reduction not in ("sum", "mean"):
            raise ValueError(f"reduction {reduction!r} is not supported by the distillation loss")
        elif reduction == "mean" and self.criterion.reduction == "sum":
            loss = loss / y_pred.shape[0]
        return loss

    def __getstate__(self):
        # torch.save(model) pickles model.loss_func, i.e. this object: leave the teacher logits
        # (possibly a large memory map) and the hook handle out
        state = dict(self.__dict__)
        state["teacher"], state["_rows"] = None, None
        return state


def attach(model, teacher_logits, criterion: nn.Module, train_mode: bool = True) -> DeepCTRDistillation:
    """Distil into the compiled DeepCTR-Torch ``model`` through its own ``fit``.

    Args:
        model: a DeepCTR-Torch model on which ``compile`` has been called.
        teacher_logits: a :class:`~fastkd.TeacherCache` or float tensor/array [N, M]: row i holds
            the M teachers' logits for row i of the ``x`` given to :meth:`DeepCTRDistillation.inputs`.
        criterion: a fastkd loss module, e.g. ``GatedDistillLoss(M, student_outputs="prob")``.
        train_mode: put the model back in training mode for every training batch (default):
            DeepCTR-Torch 0.3.0's ``fit`` leaves it in eval mode after the first validation pass,
            so every later epoch would train without dropout and with frozen BatchNorm statistics.
            False keeps DeepCTR's behaviour.

    Returns:
        the :class:`DeepCTRDistillation`; train with ``model.fit(kd.inputs(x), y, ...)``.
    """
    return DeepCTRDistillation(model, teacher_logits, criterion, train_mode)


def lr_decay_on_plateau(monitor: str = "val_auc", mode: str = "max", factor: float = 0.1):
    """A DeepCTR-Torch callback dividing the learning rate after each epoch without improvement.

    fastkd's own training rule (``TrainConfig.reduce_lr_on_plateau``): after an epoch whose
    ``monitor`` (a key of DeepCTR's epoch logs, e.g. ``"val_auc"``) is not better than the best so
    far, every learning rate of ``model.optim`` is multiplied by ``factor``. DeepCTR-Torch has no
    such callback; pair it with its ``EarlyStopping(..., restore_best_weights=True)``.

    Example::

        stop = EarlyStopping("val_auc", patience=2, mode="max", restore_best_weights=True)
        student.fit(kd.inputs(x), y, validation_data=(x_val, y_val),
                    callbacks=[stop, kd_deepctr.lr_decay_on_plateau("val_auc")])
    """
    from deepctr_torch.callbacks import Callback

    from ..train.early_stopping import improves

    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor}")

    class LRDecayOnPlateau(Callback):
        def on_train_begin(self, logs=None):
            self.best = None

        def on_epoch_end(self, epoch, logs=None):
            if not logs or monitor not in logs:
                raise KeyError(f"lr_decay_on_plateau: {monitor!r} is not in DeepCTR's epoch logs "
                               f"({sorted(logs or {})}); pass validation_data and the metric to compile()")
            value = float(logs[monitor])
            if improves(value, self.best, mode):  # fastkd's own rule (a non-finite value never improves)
                self.best = value
                return
            for group in self.model.optim.param_groups:
                group["lr"] *= factor

    return LRDecayOnPlateau()

"""Training the teachers: one routine for the CLI's experiments and the :class:`~fastkd.Distiller`.

:func:`train_teachers` trains M teachers on labels and returns a :class:`TeacherSet`. With
``folds=K > 1`` it *cross-fits* them: the rows it is given are dealt into K folds, and for every
teacher K fold models are trained, fold model k on the rows outside fold k (stopping on fold k).
Then

* :meth:`TeacherSet.out_of_fold` gives every one of those rows the outputs of the fold model that
  never trained on it: honest soft labels, unlike a teacher's (over-fitted) predictions on its own
  training rows;
* :meth:`TeacherSet.outputs` gives any other rows (validation, test, augmented rows) the average
  of the K fold models' logits, a bagged teacher (each fold model sees ``(K-1)/K`` of the rows).

Seeds: teacher ``i`` (0-based) of a run seeded ``seed`` is initialised and trained with
:func:`teacher_seed` ``(seed, i)``; its fold ``k`` trains with ``teacher_seed(seed, i, k)``.
Fold models start from the teacher's own initial weights and differ by their rows and data order.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..data import CTRData
from ..data.rows import as_tensor_rows
from .config import TrainConfig
from .evaluation import predict
from .manifest import data_fingerprint
from .loop import _freeze, train_model

__all__ = ["TeacherSet", "FoldAverage", "train_teachers", "teacher_seed", "fold_assignment", "fingerprint"]


def teacher_seed(seed: int, index: int, fold: int = 0) -> int:
    """Seed of teacher ``index`` (0-based), fold ``fold``, in a run seeded ``seed``."""
    return seed * 100 + index + 1 + 10_000 * fold


def fingerprint(data: CTRData) -> str:
    """A digest of ``data``'s ids and labels (the manifests' :func:`~fastkd.train.manifest.data_fingerprint`):
    ties out-of-fold outputs to the rows they were fitted on."""
    fp = data_fingerprint(data.ids, data.labels)
    return f"{fp['rows']}x{fp['fields']}:{fp['ids']}:{fp['labels']}"


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` rows: a seeded permutation dealt round-robin, so fold sizes differ by
    at most one. Returns int64 ``[n]`` with values in ``[0, folds)``."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2 to cross-fit, got {folds}")
    if n < 2 * folds:
        raise ValueError(f"cross-fitting {folds} folds needs at least {2 * folds} rows, got {n}")
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


class FoldAverage(nn.Module):
    """The K fold models of one cross-fitted teacher as one model: their logits averaged.

    Hidden vectors are not offered: each fold model has its own hidden basis, so their average
    means nothing (hints and the hidden gate need ``folds=1``).

    Shape:
        - Input: ``ids`` int64 ``[B, F]``.
        - Output: logits ``[B]``.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("FoldAverage needs at least one model")
        self.folds = nn.ModuleList(models)
        self.hidden_dim = 0

    def forward(self, ids: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        if return_hidden:
            raise ValueError("a cross-fitted teacher has no hidden vector (one basis per fold model); "
                             "use teacher_folds=1 for hints or gate='hidden'")
        return torch.stack([m(ids) for m in self.folds]).mean(0)


@dataclasses.dataclass
class TeacherSet:
    """Trained teachers, optionally cross-fitted (see the module docstring).

    Attributes:
        models: one model per teacher (a :class:`FoldAverage` when cross-fitted), frozen.
        folds: ``K`` (1: not cross-fitted).
        fold_of: fold of each fitted row, int64 ``[N]`` (None when ``folds == 1``).
        fitted: :func:`fingerprint` of the rows the fold models were fitted on (cross-fitted), or
            the teachers trained on (``saw_validation``); None otherwise.
        summaries: per teacher, the training summaries (one per fold).
        seconds: wall time of the training.
        saw_validation: the teachers trained on the merged validation rows too (``teacher_rows=
            "merged"``): their logits there are not honest, so a stacked gate fits on the
            monitor rows alone.
    """

    models: List[nn.Module]
    folds: int = 1
    fold_of: Optional[np.ndarray] = None
    fitted: Optional[str] = None
    summaries: List[List[dict]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    saw_validation: bool = False

    def __len__(self) -> int:
        return len(self.models)

    @property
    def hidden_dim(self) -> int:
        return max(int(getattr(m, "hidden_dim", 0)) for m in self.models)

    def covers(self, data: CTRData) -> bool:
        """Whether ``data`` are the rows the fold models were fitted on (out-of-fold outputs exist)."""
        return self.fitted is not None and len(data) == len(self.fold_of) and fingerprint(data) == self.fitted

    @torch.no_grad()
    def outputs(self, data, hidden: bool = False, batch_size: int = 16384
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Teachers' logits ``[N, M]`` float32 (and hidden ``[N, M, d]``, zero-padded to the widest)
        on rows no teacher trained on; a cross-fitted teacher gives its fold models' mean."""
        ids = as_tensor_rows(data.ids) if isinstance(data, CTRData) else data
        n, m = ids.shape[0], len(self.models)
        d = self.hidden_dim if hidden else 0
        if hidden and (self.folds > 1 or d < 1):
            raise ValueError("hidden vectors need teachers that are not cross-fitted and declare hidden_dim")
        logits = np.empty((n, m), dtype=np.float32)
        hid = np.zeros((n, m, d), dtype=np.float32) if hidden else None
        for j, model in enumerate(self.models):
            out = predict(model, ids, batch_size, return_hidden=hidden)
            if hidden:
                logits[:, j] = out[0].float().numpy()
                hid[:, j, : out[1].shape[1]] = out[1].float().numpy()
            else:
                logits[:, j] = out.float().numpy()
        return logits, hid

    @torch.no_grad()
    def out_of_fold(self, data: CTRData, batch_size: int = 16384) -> np.ndarray:
        """Logits ``[N, M]`` on the fitted rows, each row's from the fold model that did not train on it."""
        if not self.covers(data):
            raise ValueError("out-of-fold outputs exist only for the rows the teachers were cross-fitted on "
                             f"({'no folds' if self.fold_of is None else f'{len(self.fold_of)} rows'}; got {len(data)} "
                             "rows with another fingerprint)")
        ids = as_tensor_rows(data.ids)
        logits = np.empty((len(data), len(self.models)), dtype=np.float32)
        for j, model in enumerate(self.models):
            for k, fold_model in enumerate(model.folds):
                rows = np.flatnonzero(self.fold_of == k)
                logits[rows, j] = predict(fold_model, ids[torch.from_numpy(rows)], batch_size).float().numpy()
        return logits

    def honest_logits(self, data: CTRData, batch_size: int = 16384) -> np.ndarray:
        """Out-of-fold logits when ``data`` are the fitted rows, else :meth:`outputs`' logits."""
        if self.covers(data):
            return self.out_of_fold(data, batch_size)
        return self.outputs(data, batch_size=batch_size)[0]


def train_teachers(teachers: Sequence[nn.Module], train: CTRData, valid: CTRData, cfg: TrainConfig, *,
                   folds: int = 1, seed: int = 0, names: Optional[Sequence[str]] = None,
                   log: Optional[Callable[[str], None]] = None, checkpoint_dir=None,
                   resume: bool = False) -> TeacherSet:
    """Train ``teachers`` on labels; with ``folds > 1``, cross-fit them on ``train``.

    ``folds == 1``: teacher ``i`` trains on ``train`` and stops on ``valid`` with
    ``cfg`` seeded :func:`teacher_seed` ``(seed, i)``. ``folds == K > 1``: ``train``'s rows are dealt
    into K folds (:func:`fold_assignment` seeded ``seed``); fold model k of teacher i (a copy of the
    teacher's initial weights) trains on the other folds and stops on fold k; ``valid`` is not used,
    so rows held out there stay unseen by every teacher. The models are trained in place and frozen.

    Args:
        teachers: untrained teacher models.
        train, valid: see above.
        cfg: the teachers' training settings (``cfg.merge_validation`` must be off).
        folds: 1, or K >= 2 to cross-fit.
        seed: the run's seed.
        names: teacher names for logs and progress.
        log: called with one line per trained model.
        checkpoint_dir, resume: per-model checkpoints ``teacher{i}[.fold{k}].pt`` (see
            :func:`~fastkd.train.train_model`).

    Returns:
        A :class:`TeacherSet`.
    """
    from pathlib import Path

    if cfg.merge_validation:
        raise ValueError("teachers train with merge_validation off (use TrainConfig.for_teachers())")
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    names = list(names) if names is not None else [type(t).__name__ for t in teachers]
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    t0 = time.perf_counter()
    out: List[nn.Module] = []
    summaries: List[List[dict]] = []
    fold_of = fold_assignment(len(train), folds, seed) if folds > 1 else None
    for i, teacher in enumerate(teachers):
        if folds == 1:
            path = ckpt / f"teacher{i}.pt" if ckpt else None
            t1 = time.perf_counter()
            s = train_model(teacher, train, valid, dataclasses.replace(cfg, seed=teacher_seed(seed, i)),
                            desc=f"teacher {names[i]}", checkpoint=path, resume=resume)
            s["seconds"] = time.perf_counter() - t1
            out.append(teacher)
            summaries.append([s])
            continue
        # copies taken before any training: every fold model starts from the teacher's initial weights
        fold_models = [teacher] + [copy.deepcopy(teacher) for _ in range(folds - 1)]
        fold_summ = []
        for k, model in enumerate(fold_models):
            inside = fold_of != k
            path = ckpt / f"teacher{i}.fold{k}.pt" if ckpt else None
            t1 = time.perf_counter()
            s = train_model(model, train.subset(inside), train.subset(~inside),
                            dataclasses.replace(cfg, seed=teacher_seed(seed, i, k)),
                            desc=f"teacher {names[i]} fold {k + 1}/{folds}", checkpoint=path, resume=resume)
            s["seconds"] = time.perf_counter() - t1
            fold_summ.append(s)
            if log is not None:
                log(f"    teacher {names[i]} fold {k + 1}/{folds}: {s['epochs']} epochs ({s['seconds']:.0f}s)")
        out.append(FoldAverage(fold_models))
        summaries.append(fold_summ)
    _freeze(out)
    return TeacherSet(out, folds, fold_of, fingerprint(train) if folds > 1 else None, summaries,
                      time.perf_counter() - t0)

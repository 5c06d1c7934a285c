"""The teachers' outputs a :class:`~fastkd.train.distiller.Distiller` distils from: the transfer
cache (real and augmented rows), the rows a stacked gate may fit on (honest logits only), the
ensemble target per row, and the check that lets another Distiller share all of it."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
import torch

from .. import distributed as _dist
from ..data import CTRData
from ..data.rows import Rows, as_tensor_rows
from ..gates import GATE_ALPHA_BATCH, GateRows, ensemble_logits, fit_gate, gate_alpha, make_gate
from .config import TrainConfig
from .teacher_cache import TeacherCache
from .teachers import TeacherSet

if TYPE_CHECKING:  # the Distiller imports this module
    from .distiller import Distiller

__all__ = ["transfer_cache", "honest_gate_rows", "ensemble_targets", "rank_file", "Prepared", "check_shareable"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The rows a prepared signal belongs to: the ``train``/``valid`` objects it was built from,
    the student's rows and monitor rows cut from them, the augmented rows, and (with
    ``student_embed_init``) the teacher whose embedding students start from."""

    train: CTRData
    valid: CTRData
    student_train: CTRData
    monitor: CTRData
    aug_ids: np.ndarray
    embed_source: Optional[int] = None


def rank_file(cache_dir: Path, name: str, dtype, shape) -> np.ndarray:
    """A new memory-mapped array ``<cache_dir>/<name>.rank<r>.npy`` (this rank's): remade on
    every fit like the teacher cache, never read back from an earlier one."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(cache_dir / f"{name}.rank{_dist.get_rank()}.npy", mode="w+",
                                     dtype=dtype, shape=shape)


def transfer_cache(ts: TeacherSet, rows: CTRData, aug_ids: np.ndarray, *, hidden: bool, batch_size: int,
                   path: Optional[Path], progress: bool) -> TeacherCache:
    """The teachers' logits (and hidden vectors) for ``rows`` then the augmented rows ``aug_ids``.

    Not cross-fitted: one pass over the real rows then the augmented ones, written in place (into
    ``path`` when set) and sharded under torch.distributed. Cross-fitted: each real row's logit
    from the fold model that did not see it, the augmented rows' from the fold models' average.
    """
    teachers = list(ts.models)
    if ts.folds == 1:
        data = rows if not len(aug_ids) else as_tensor_rows(Rows([rows.ids, aug_ids]))
        return TeacherCache.build(teachers, data, hidden=hidden, batch_size=batch_size, path=path,
                                  progress=progress)
    logits, hid = ts.out_of_fold(rows, batch_size), None
    if len(aug_ids):
        a_logits, a_hidden = ts.outputs(torch.from_numpy(aug_ids), hidden, batch_size)
        logits = np.concatenate([logits, a_logits])
        hid = None if hid is None else np.concatenate([hid, a_hidden])
    return TeacherCache.from_arrays(logits, hid, path=path, data=[rows.ids, aug_ids] if len(aug_ids) else rows.ids,
                                    teachers=teachers)


def honest_gate_rows(ts: TeacherSet, train: CTRData, valid: CTRData, student_train: CTRData, monitor: CTRData,
                     cache: TeacherCache, *, merge_validation: bool, hidden: bool,
                     batch_size: int) -> Tuple[GateRows, GateRows]:
    """``(fit rows, monitor rows)`` for a stacked gate: rows whose teacher logits are honest.

    Cross-fitted: every student training row (its out-of-fold logit), stopped on the monitor rows.
    Teachers that saw the merged validation rows: the monitor rows' two halves. Otherwise the
    merged validation rows, stopped on the monitor rows, or without merging the validation
    split's two halves.
    """
    def rows_of(data: CTRData) -> GateRows:
        z, h = ts.outputs(data, hidden, batch_size)
        return GateRows(data.ids, z, data.labels, h)

    def halves(data: CTRData, error: str) -> Tuple[GateRows, GateRows]:
        half = len(data) // 2
        if half < 1:
            raise ValueError(error)
        return rows_of(data.subset(np.arange(half))), rows_of(data.subset(np.arange(half, len(data))))

    def cached(data: CTRData, a: int, b: int) -> GateRows:
        z, h = cache.gather(torch.arange(a, b))
        return GateRows(data.ids, z.numpy(), np.asarray(data.labels), None if h is None else h.numpy())

    if ts.folds > 1:  # every student training row has an out-of-fold logit
        return cached(student_train, 0, len(student_train)), rows_of(monitor)
    if ts.saw_validation:  # teachers trained on the merged rows too: the monitor rows are all that is left
        return halves(monitor, "a stacked gate of teachers trained on the merged validation rows needs >= 2 "
                               "monitor rows")
    if merge_validation:  # the merged validation rows: in the student's rows, unseen by teachers
        a, b = len(train), len(student_train)
        # those rows are the validation split's last b - a (TrainConfig.split_validation); taken
        # from it, they stay a view of memory-mapped data instead of a copy out of the Rows
        return cached(valid.subset(np.arange(len(valid) - (b - a), len(valid))), a, b), rows_of(monitor)
    return halves(valid, "a stacked gate without folds or merged validation needs >= 2 validation rows")


def ensemble_targets(ts: TeacherSet, rows: Prepared, cache: TeacherCache, *, gate: str, hidden_dim: int,
                     ensemble: str, temperature: float, config: TrainConfig,
                     cache_dir: Optional[Path]) -> Tuple[torch.Tensor, Optional[torch.nn.Module], Optional[dict]]:
    """The ensemble's logit per cached row, ``[N, 1]``, from plain averaging (``gate="mean"``) or
    a gate of kind ``gate`` fitted now on honest rows (:func:`honest_gate_rows`) and frozen.

    Returns ``(targets, the fitted gate or None, its fit summary or None)``; with ``cache_dir``
    the targets are a memory-mapped file there.
    """
    fitted, summary = None, None
    student_train = rows.student_train
    if gate != "mean":
        t0 = time.perf_counter()
        fit, mon = honest_gate_rows(ts, rows.train, rows.valid, student_train, rows.monitor, cache,
                                    merge_validation=config.merge_validation, hidden=gate == "hidden",
                                    batch_size=config.eval_batch_size)
        torch.manual_seed(config.seed)
        fitted = make_gate(gate, fit.logits.shape[1], hidden_dim=hidden_dim, field_sizes=student_train.field_sizes)
        summary = fit_gate(fitted, fit, mon, batch_size=config.batch_size, seed=config.seed)
        summary.update(fit_rows=len(fit), monitor_rows=len(mon), seconds=time.perf_counter() - t0)
    # read block by block in place (no concatenated copy of the rows)
    ids = Rows([student_train.ids, rows.aug_ids]) if len(rows.aug_ids) else student_train.ids
    n = len(cache)
    # beside the cached logits, memory-mapped, with cache_dir (large data)
    out = torch.empty(n, 1) if cache_dir is None else torch.from_numpy(rank_file(cache_dir, "targets", np.float32,
                                                                                  (n, 1)))
    # block by block: the cache's logits and the gate's α for every row at once would cost
    # 2·M floats a row on top of the targets (large data); blocks are whole gate_alpha batches,
    # so every row's α is computed in the batch it would be in a single pass
    block = 4 * GATE_ALPHA_BATCH
    for a in range(0, n, block):
        b = min(a + block, n)
        z, h = cache.gather(torch.arange(a, b))
        if fitted is None:
            alpha = torch.full_like(z, 1.0 / z.shape[1])
        else:
            alpha = gate_alpha(fitted, GateRows(ids[a:b], z.numpy(), None, None if h is None else h.numpy()),
                               GATE_ALPHA_BATCH)
        out[a:b, 0] = ensemble_logits(z.float(), alpha.float(), ensemble, temperature)
    return out, fitted, summary


def check_shareable(mine: "Distiller", other: "Distiller", train: CTRData, valid: CTRData) -> Prepared:
    """``other``'s prepared rows, after checking that its signal is the one ``mine`` would build
    on ``train``/``valid`` (raises ``ValueError`` naming the first difference)."""
    p = getattr(other, "_prepared", None)
    if mine.mode != "pretrain" or other.mode != "pretrain":
        raise ValueError("signal_from needs two pre-train Distillers: co-training has no fixed teacher signal")
    if p is None:
        raise ValueError("signal_from: that Distiller holds no prepared signal (call its prepare() first; "
                         "release() drops it)")
    if p.train is not train or p.valid is not valid:
        raise ValueError("signal_from: that Distiller's signal was prepared on other train/valid data")
    ours, theirs = mine._settings(), other._settings()
    # both sides' keys: a setting at its default may be left out of one side's dict
    diff = next((k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)), None)
    if diff is not None:
        raise ValueError(f"signal_from: the Distillers' {diff!r} differs ({ours.get(diff)!r} vs {theirs.get(diff)!r})")
    if mine.config != other.config:
        raise ValueError("signal_from: the Distillers' TrainConfig differs (the signal depends on its seed, "
                         "validation cut and batch sizes)")
    same_teachers = len(mine.teachers) == len(other.teachers) and all(
        a is b for a, b in zip(mine.teachers, other.teachers))
    if mine.hidden_dim != other.hidden_dim or not (mine.teachers_trained or mine.teacher_set is not None) \
            or not same_teachers:
        raise ValueError("signal_from: the Distillers must hold the same trained teacher models (pass the "
                         "other's teacher_set)")
    return p

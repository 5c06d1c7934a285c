"""The teachers' outputs a :class:`~fastkd.train.distiller.Distiller` distils from: the transfer
cache (real and augmented rows) and the rows a stacked gate may fit on (honest logits only)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..data import CTRData
from ..data.rows import Rows, as_tensor_rows
from ..gates import GateRows
from .teacher_cache import TeacherCache
from .teachers import TeacherSet

__all__ = ["transfer_cache", "honest_gate_rows"]


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

"""A dataset wrapper that hands out each row's teacher logits by sample index."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import Dataset

from ._common import num_rows, teacher_rows

__all__ = ["TeacherLogitsDataset"]


class TeacherLogitsDataset(Dataset):
    """``dataset[i]`` plus row ``i`` of the teachers' logits: any DataLoader over it (shuffled,
    any batch size, worker processes) yields teacher logits aligned with its samples.

    The teacher logits are appended to whatever ``dataset[i]`` is: a tuple ``(x, y)`` becomes
    ``(x, y, t)``, a list likewise, a dict gains the key ``key``, anything else ``v`` becomes
    ``(v, t)``; the default collate then stacks them to ``[B, M]``.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``) whose row ``i`` is the
            teachers' row ``i``.
        teacher_logits: a :class:`~fastkd.TeacherCache` built on the same rows (read by index,
            memory-mapped or not), or a float tensor / numpy array ``[N, M]``.
        key: the key added to dict samples.

    Raises:
        ValueError: the row counts differ, or a dict sample already has ``key``.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from fastkd.integration import TeacherLogitsDataset
        >>> ds = TeacherLogitsDataset(TensorDataset(torch.randn(10, 4), torch.ones(10)), torch.randn(10, 3))
        >>> x, y, t = next(iter(DataLoader(ds, batch_size=4, shuffle=True)))
        >>> t.shape
        torch.Size([4, 3])
    """

    def __init__(self, dataset, teacher_logits, *, key: str = "teacher_logits") -> None:
        self.dataset = dataset
        self.teacher_logits = teacher_rows(teacher_logits)
        self.key = key
        n, m = len(dataset), num_rows(self.teacher_logits)
        if n != m:
            raise ValueError(f"dataset has {n} rows but teacher_logits has {m}: row i of each must be the same sample")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        t = self.teacher_logits
        # a TeacherCache's memory map: a one-row fancy index copies the row (a plain index would
        # view the read-only map, which torch warns about)
        row = t[index] if isinstance(t, torch.Tensor) else t[[index]][0]
        return with_teacher_logits(self.dataset[index], row, self.key)


def with_teacher_logits(item, logits, key: str):
    """``item`` with ``logits`` appended (tuple, list) or added under ``key`` (mapping)."""
    if isinstance(item, Mapping):
        if key in item:
            raise ValueError(f"the dataset's samples already have a {key!r} key; pass another key=")
        return {**item, key: logits}
    if isinstance(item, tuple):
        return (*item, logits)
    if isinstance(item, list):
        return [*item, logits]
    return (item, logits)

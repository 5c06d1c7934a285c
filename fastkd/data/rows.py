"""Row blocks read as one array, without the concatenated copy: :class:`Rows`, :class:`TensorRows`.

Large data lives in memory-mapped files (:func:`~fastkd.data.cached_split`), and a training set
is often a concatenation: the training split plus the validation rows after the monitor rows
(``TrainConfig(merge_validation=True)``). ``np.concatenate`` would copy every row into anonymous
memory; :class:`Rows` keeps the blocks (memory-mapped or not) and gathers from them, so the rows
stay in the page cache, where the kernel can drop them. Gathers give the values the
concatenated array would give, bit for bit.
"""
from __future__ import annotations

import mmap
from typing import List, Sequence, Union

import numpy as np

__all__ = ["Rows", "TensorRows", "as_tensor_rows", "is_file_backed"]


def is_file_backed(a) -> bool:
    """Whether ``a`` (an array, or :class:`Rows`) reads from a memory-mapped file."""
    if isinstance(a, Rows):
        return any(is_file_backed(p) for p in a.parts)
    while isinstance(a, np.ndarray):
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return isinstance(a, mmap.mmap)


class Rows:
    """The row-wise concatenation of ``parts`` (numpy arrays with equal trailing shape and dtype),
    read without building it.

    ``rows[i:j]`` and ``rows[index]`` (an integer array, any order, repeats allowed) return
    ``numpy`` arrays equal to ``np.concatenate(parts)[...]``; ``np.asarray(rows)`` builds the copy.

    Shape:
        ``[sum(len(p) for p in parts), *parts[0].shape[1:]]``.

    Example:
        >>> import numpy as np
        >>> r = Rows([np.arange(6).reshape(3, 2), np.arange(6, 10).reshape(2, 2)])
        >>> r.shape, r[np.array([4, 0])].tolist(), r[2:4].tolist()
        ((5, 2), [[8, 9], [0, 1]], [[4, 5], [6, 7]])
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        flat: List[np.ndarray] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Rows) else [p])
        if not flat:
            raise ValueError("Rows needs at least one part")
        tail, dtype = flat[0].shape[1:], flat[0].dtype
        for p in flat:
            if p.shape[1:] != tail or p.dtype != dtype:
                raise ValueError(f"parts must share trailing shape and dtype: {p.shape}/{p.dtype} vs {tail}/{dtype}")
        self.parts = [p for p in flat if len(p)] or flat[:1]
        self.bounds = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.shape = (int(self.bounds[-1]),) + tuple(tail)
        self.dtype = dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Rows(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Union[slice, np.ndarray, Sequence[int]]) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = []
            for p, a in zip(self.parts, self.bounds[:-1]):
                lo, hi = max(start - a, 0), min(stop - a, len(p))
                if lo < hi:
                    out.append(p[lo:hi])
            if len(out) == 1:
                return out[0]
            return np.concatenate(out) if out else self.parts[0][:0]
        if isinstance(key, tuple):  # (rows, columns) element-wise, as numpy's a[rows, cols]
            index, cols = (np.asarray(k) for k in key)
            return self._gather(index, cols)
        return self._gather(np.asarray(key), None)

    def _gather(self, index: np.ndarray, cols) -> np.ndarray:
        if index.dtype == bool:
            raise TypeError("Rows takes slices and integer indices, not boolean masks")
        index = index.astype(np.int64, copy=False)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} rows")
        index = np.where(index < 0, index + len(self), index)
        if cols is not None:
            index, cols = np.broadcast_arrays(index, cols)
        if len(self.parts) == 1:
            return self.parts[0][index] if cols is None else self.parts[0][index, cols]
        shape = index.shape + (self.shape[1:] if cols is None else ())
        out = np.empty(shape, dtype=self.dtype)
        part = np.searchsorted(self.bounds, index, side="right") - 1
        for k in np.unique(part):
            sel = part == k
            local = index[sel] - self.bounds[k]
            out[sel] = self.parts[k][local] if cols is None else self.parts[k][local, cols[sel]]
        return out


class TensorRows:
    """:class:`Rows` for torch code: slices and ``LongTensor`` indices give CPU tensors.

    Args:
        rows: the :class:`Rows` to read.

    Shape: that of the rows; ``device`` is the CPU.

    Example:
        >>> import numpy as np, torch
        >>> t = TensorRows(Rows([np.arange(4).reshape(2, 2), np.arange(4, 6).reshape(1, 2)]))
        >>> t[torch.tensor([2, 0])].tolist(), t.shape
        ([[4, 5], [0, 1]], (3, 2))
    """

    def __init__(self, rows: Rows) -> None:
        import torch

        self.rows = rows
        self.shape = rows.shape
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        import torch

        if isinstance(key, torch.Tensor):
            key = key.numpy()
        return torch.from_numpy(np.ascontiguousarray(self.rows[key]))


def as_tensor_rows(a):
    """A torch view of ``a``: ``torch.from_numpy`` of an array (no copy), :class:`TensorRows` of
    :class:`Rows`; anything else (a tensor) unchanged.

    Example:
        >>> import numpy as np
        >>> type(as_tensor_rows(np.zeros((2, 3)))).__name__, type(as_tensor_rows(Rows([np.zeros((2, 3))]))).__name__
        ('Tensor', 'TensorRows')
    """
    import torch

    if isinstance(a, Rows):
        return TensorRows(a)
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return a

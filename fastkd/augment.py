"""Teacher-labelled augmentation: extra transfer rows for the student (Bucilă et al., 2006).

A small model comes closer to an ensemble when it sees the ensemble's function on more inputs
than there are labelled rows ("Model compression", KDD 2006). The rows made here are real rows
with some fields swapped for another real row's value of the same field, i.e. drawn from the
field's empirical distribution: new (user, item, context) combinations near the data. They carry
no label; the student learns them from the teachers' soft labels alone (the
:class:`~fastkd.Distiller` switches the hard-label term off for them).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .data.rows import Rows

__all__ = ["swap_augment", "augmented_rows", "BLOCK_ROWS"]


# new rows drawn per block, each from its own generator: making them costs one block of
# temporaries (about 200 bytes per row) whatever their number. Block 0 draws from
# default_rng(seed), as every block-free draw did, so runs of up to BLOCK_ROWS new rows keep
# the rows (and results) of earlier versions; block k >= 1 from default_rng([seed, k]).
BLOCK_ROWS = 1 << 19


def swap_augment(ids: np.ndarray, ratio: float, swap_prob: float = 0.2, seed: int = 0,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
    """``round(ratio * N)`` new rows made from ``ids`` by field-wise swaps.

    Each new row copies a uniformly drawn real row, then replaces each field's value, with
    probability ``swap_prob``, by that field's value in another uniformly drawn real row (the
    donor is never the parent itself). A row that drew no swap gets one (in a random field); a
    swapped-in value may still equal the old one when two rows share it.

    Args:
        ids: int64 ``[N, F]`` real rows (an array, or memory-mapped :class:`~fastkd.data.rows.Rows`,
            read in place).
        ratio: new rows per real row (0 gives none).
        swap_prob: per-field swap probability, in (0, 1].
        seed: the draws are a function of the seed alone (new rows are made in blocks of
            :data:`BLOCK_ROWS`: block 0 from ``numpy.random.default_rng(seed)``, block ``k >= 1``
            from ``numpy.random.default_rng([seed, k])``).
        out: where to write the rows (e.g. a memory-mapped file for large data: only one block's
            temporaries are then held in memory); default a new array.

    Shape:
        - Output: int64 ``[round(ratio * N), F]``; every value of column ``f`` occurs in ``ids[:, f]``.

    Example:
        >>> import numpy as np
        >>> ids = np.array([[0, 10], [1, 11], [2, 12]])
        >>> swap_augment(ids, ratio=2.0, swap_prob=0.5, seed=0).shape
        (6, 2)
    """
    if not isinstance(ids, Rows):  # Rows (memory-mapped blocks) are gathered from in place
        ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be an integer array [N, F], got {ids.dtype} {ids.shape}")
    if not np.isfinite(ratio) or ratio < 0:
        raise ValueError(f"ratio must be a finite number >= 0, got {ratio}")
    if not 0.0 < swap_prob <= 1.0:
        raise ValueError(f"swap_prob must be in (0, 1], got {swap_prob}")
    n, f = ids.shape
    r = augmented_rows(n, ratio)
    if out is None:
        out = np.empty((r, f), dtype=np.int64)
    elif out.shape != (r, f) or out.dtype != np.int64:
        raise ValueError(f"out must be int64 {(r, f)}, got {out.dtype} {tuple(out.shape)}")
    if r and n == 0:
        raise ValueError("cannot augment an empty set of rows")
    for k, a in enumerate(range(0, r, BLOCK_ROWS)):
        b = min(a + BLOCK_ROWS, r)
        rng = np.random.default_rng(seed if k == 0 else [seed, k])
        out[a:b] = _swap_block(ids, b - a, swap_prob, rng)
    return out


def augmented_rows(n: int, ratio: float) -> int:
    """How many rows :func:`swap_augment` makes from ``n`` real rows at ``ratio``."""
    return int(round(ratio * n))


def _swap_block(ids, r: int, swap_prob: float, rng: np.random.Generator) -> np.ndarray:
    """``r`` new rows (see :func:`swap_augment`) from one generator."""
    n, f = ids.shape
    parent = rng.integers(0, n, r)
    rows_out = ids[parent].astype(np.int64, copy=True)
    swap = rng.random((r, f)) < swap_prob
    none = np.flatnonzero(~swap.any(axis=1))
    swap[none, rng.integers(0, f, none.size)] = True
    rows, cols = np.nonzero(swap)
    if n > 1:  # the donor is another row than the parent
        donor = rng.integers(0, n - 1, rows.size)
        donor += donor >= parent[rows]
    else:
        donor = np.zeros(rows.size, dtype=np.int64)
    rows_out[rows, cols] = ids[donor, cols]
    return rows_out

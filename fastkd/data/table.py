"""Model-ready, fully encoded CTR data (:class:`CTRData`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .readers.report import ReadReport
from .rows import Rows, is_file_backed

IndexLike = Union[slice, np.ndarray, Sequence[int], Sequence[bool]]


@dataclass
class CTRData:
    """Integer-encoded multi-field categorical data with binary labels.

    Every field ``f`` is one categorical feature; ``ids[:, f]`` lies in ``[0, field_sizes[f])``.
    By the convention of :class:`~fastkd.data.FeatureEncoder`, id 0 means "missing", but
    :class:`CTRData` itself does not rely on it (synthetic data uses all ids for values).

    Args:
        ids: int64 array ``[N, F]`` (converted if another integer dtype is given).
        labels: float32 array ``[N]`` with values in {0, 1}.
        field_names: ``F`` names.
        field_sizes: ``F`` vocabulary sizes (embedding table rows per field).
        read_report: what reading the source saw (:class:`~fastkd.data.ReadReport`: rows read and
            kept, malformed rows with the first line numbers and reasons). Set by
            :func:`~fastkd.data.load` on the data it returns; None for data built otherwise and for
            the results of :meth:`subset`, :meth:`split` and :meth:`concat` (the report describes
            the whole read, not a part of it). Not compared and not shown by ``repr``.

    Shape:
        ``ids``: ``[N, F]``, ``labels``: ``[N]``.

    Example:
        >>> import numpy as np
        >>> d = CTRData(np.array([[0, 1], [2, 0]]), np.array([1., 0.]), ["a", "b"], [3, 2])
        >>> train, valid, test = d.split((0.5, 0.5, 0.0))
        >>> len(train), len(valid), len(test)
        (1, 1, 0)
    """

    ids: np.ndarray
    labels: np.ndarray
    field_names: List[str]
    field_sizes: List[int]
    read_report: Optional[ReadReport] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.ids, Rows) or isinstance(self.labels, Rows):
            return self._check_rows()
        ids = np.asarray(self.ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be a 2-d array [N, F], got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids must have an integer dtype, got {ids.dtype}")
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        labels = np.asarray(self.labels)
        if labels.shape != (ids.shape[0],):
            raise ValueError(f"labels must have shape ({ids.shape[0]},) to match ids, got {labels.shape}")
        self.labels = np.ascontiguousarray(labels, dtype=np.float32)
        self._check_fields()
        if self.ids.size:
            # A silently out-of-range id would only surface later as an embedding index error
            # (or, worse, a wrong row on a device without bounds checks), so check it here.
            lo = self.ids.min(axis=0)
            hi = self.ids.max(axis=0)
            sizes = np.asarray(self.field_sizes, dtype=np.int64)
            bad = np.flatnonzero((lo < 0) | (hi >= sizes))
            if bad.size:
                f = int(bad[0])
                raise ValueError(
                    f"ids of field {self.field_names[f]!r} span [{lo[f]}, {hi[f]}] but field_sizes[{f}] "
                    f"= {self.field_sizes[f]}")
        if self.labels.size and not np.all((self.labels == 0) | (self.labels == 1)):
            raise ValueError("labels must be 0 or 1")

    def _check_rows(self) -> None:
        """The checks of ``__post_init__`` for :class:`~fastkd.data.rows.Rows` (block by block, no copy)."""
        if not (isinstance(self.ids, Rows) and isinstance(self.labels, Rows)):
            raise ValueError("ids and labels must both be Rows, or both arrays")
        if self.ids.ndim != 2 or self.ids.dtype != np.int64 or self.labels.dtype != np.float32:
            raise ValueError(f"Rows ids must be int64 [N, F] and labels float32, got {self.ids.dtype} "
                             f"{self.ids.shape} / {self.labels.dtype}")
        if self.labels.shape != (self.ids.shape[0],):
            raise ValueError(f"labels must have shape ({self.ids.shape[0]},) to match ids, got {self.labels.shape}")
        self._check_fields()
        # the parts are CTRData arrays (concat's inputs): already range- and label-checked

    def _check_fields(self) -> None:
        """Field names and sizes normalised, one of each per column of ``ids``, names unique."""
        self.field_names = [str(n) for n in self.field_names]
        self.field_sizes = [int(s) for s in self.field_sizes]
        n_fields = self.ids.shape[1]
        if len(self.field_names) != n_fields or len(self.field_sizes) != n_fields:
            raise ValueError(
                f"ids has {n_fields} fields but field_names has {len(self.field_names)} and "
                f"field_sizes has {len(self.field_sizes)} entries")
        if len(set(self.field_names)) != n_fields:
            raise ValueError(f"field_names must be unique, got {self.field_names}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_fields(self) -> int:
        """Number of fields ``F``."""
        return int(self.ids.shape[1])

    @property
    def positive_rate(self) -> float:
        """Fraction of rows with label 1 (``nan`` for empty data)."""
        if not len(self):
            return float("nan")
        if isinstance(self.labels, Rows):
            return float(sum(float(p.sum(dtype=np.float64)) for p in self.labels.parts) / len(self))
        return float(self.labels.mean())

    def __repr__(self) -> str:
        return (f"CTRData(n={len(self)}, fields={self.num_fields}, positive_rate={self.positive_rate:.4f}, "
                f"field_sizes={self.field_sizes})")

    def subset(self, index: IndexLike) -> "CTRData":
        """Rows selected by an integer index array, a slice or a boolean mask.

        Args:
            index: slice, integer array (any order, repeats allowed) or boolean mask of length ``N``.

        Returns:
            A new :class:`CTRData` (arrays are copies unless ``index`` is a slice, or a run of
            consecutive rows of memory-mapped data) with the same field names and sizes.
        """
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == bool:
                if index.shape != (len(self),):
                    raise ValueError(f"boolean index must have shape ({len(self)},), got {index.shape}")
            elif index.dtype.kind not in "iu" and index.size:
                raise ValueError(f"index must be a slice, an integer array or a boolean mask, got dtype {index.dtype}")
            else:
                index = index.astype(np.int64, copy=False)
                if (index.size > 1 and is_file_backed(self.ids) and index[0] >= 0 and
                        index[-1] - index[0] == index.size - 1 and np.all(np.diff(index) == 1)):
                    # a run of memory-mapped rows (the monitor split of the on-disk cache) stays a view
                    index = slice(int(index[0]), int(index[-1]) + 1)
        return CTRData(self.ids[index], self.labels[index], list(self.field_names), list(self.field_sizes))

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Tuple["CTRData", ...]:
        """Random split into ``len(fractions)`` parts.

        The rule is exact and reproducible outside this library:
        ``perm = numpy.random.default_rng(seed).permutation(n)``; part ``i < k-1`` takes the next
        ``int(fractions[i] * n)`` entries of ``perm`` (in ``perm`` order), and the last part takes all
        remaining entries. For the default three fractions: the first ``int(0.8 n)`` are train, the next
        ``int(0.1 n)`` valid, the rest test.

        Args:
            fractions: non-negative fractions summing to 1 (within 1e-6).
            seed: seed for :func:`numpy.random.default_rng`.

        Returns:
            Tuple of :class:`CTRData`, one per fraction.

        Example:
            >>> train, valid, test = data.split((0.8, 0.1, 0.1), seed=0)  # doctest: +SKIP
        """
        fr = [float(f) for f in fractions]
        if not fr:
            raise ValueError("fractions must not be empty")
        if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
        n = len(self)
        perm = np.random.default_rng(seed).permutation(n)
        parts = []
        start = 0
        for f in fr[:-1]:
            stop = start + int(f * n)
            parts.append(self.subset(perm[start:stop]))
            start = stop
        parts.append(self.subset(perm[start:]))
        return tuple(parts)

    @staticmethod
    def concat(parts: Sequence["CTRData"]) -> "CTRData":
        """Row-wise concatenation of parts that share field names and field sizes.

        Parts encoded by different encoders would have incompatible ids, so differing
        ``field_sizes`` raise instead of being merged.

        Args:
            parts: non-empty sequence of :class:`CTRData`.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one part")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            if p.field_names != first.field_names:
                raise ValueError(f"part {i} has field_names {p.field_names}, expected {first.field_names}")
            if p.field_sizes != first.field_sizes:
                raise ValueError(f"part {i} has field_sizes {p.field_sizes}, expected {first.field_sizes}")
        if any(is_file_backed(p.ids) for p in parts):
            # memory-mapped parts (the on-disk cache) stay on disk: a Rows view, not a copy
            return CTRData(Rows([p.ids for p in parts]), Rows([p.labels for p in parts]),
                           list(first.field_names), list(first.field_sizes))
        return CTRData(np.concatenate([np.asarray(p.ids) for p in parts], axis=0),
                       np.concatenate([np.asarray(p.labels) for p in parts]),
                       list(first.field_names), list(first.field_sizes))

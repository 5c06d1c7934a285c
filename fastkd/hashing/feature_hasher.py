"""``FeatureHasher``: per-field hashing of raw categorical columns into ``[N, F]`` embedding ids.

The engines and argument checks it uses live in :mod:`fastkd.hashing.engine`, the column unpacking
in :mod:`fastkd.hashing._columns`; :mod:`fastkd.hashing` (and :mod:`fastkd`) re-export this class.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._columns import _is_torch, _module_of, _unpack
from .engine import (_MODE_BUCKET0, _MODE_PLAIN, MISSING_MODES, _check_algorithm, _check_buckets, _check_int,
                     _check_seed, _run_cpu, _run_cuda)

__all__ = ["FeatureHasher"]


class FeatureHasher:
    """Per-field hashing of raw categorical columns into the ``[N, F]`` ids :class:`fastkd.MultiFieldEmbedding` takes.

    Field ``f`` with ``num_buckets[f] = B`` and seed ``s_f``:

    * ``missing="bucket0"`` (default): missing values (``None``, NaN, ``pandas.NA``, Arrow nulls and
      the empty string) get id 0; any other value ``v`` gets ``1 + hash(v, s_f) % (B - 1)``. Needs ``B >= 2``.
    * ``missing="hash"``: every value gets ``hash(v, s_f) % B``, a missing one hashed as ``""``.

    Default seeds are the field indices, ``s_f = f`` (an int ``seeds=s`` gives ``s_f = s + f``), so
    ``FeatureHasher(B)`` reproduces ``fastkd.data.FeatureEncoder("hash", num_buckets=B, seed=0)`` exactly.
    Integer (int64) columns hash their 8 little-endian bytes and may be mixed with string columns.

    Args:
        num_buckets: one int for every field, or one per field.
        seeds: ``None`` (field index), an int base seed, or one seed per field.
        algorithm: ``"xxh3"`` or ``"murmur3"``.
        missing: ``"bucket0"`` or ``"hash"``.
        num_fields: the number of fields when neither ``num_buckets`` nor ``seeds`` is a list
            (only needed for :attr:`field_sizes`/:attr:`offsets` before knowing the data).
        num_threads: CPU worker threads (default: the CPUs this process may use).

    Shape:
        ``transform(columns)``: ``F`` columns of ``N`` values -> int64 ``[N, F]``.

    Example:
        >>> hasher = FeatureHasher([1000, 10], missing="bucket0")
        >>> ids = hasher.transform([["x", None, "y"], ["u", "v", ""]])
        >>> ids.shape, hasher.field_sizes, hasher.offsets
        ((3, 2), [1000, 10], [0, 1000])
        >>> int(ids[1, 0]), int(ids[2, 1])
        (0, 0)
    """

    def __init__(self, num_buckets: Union[int, Sequence[int]], seeds: Union[None, int, Sequence[int]] = None,
                 algorithm: str = "xxh3", missing: str = "bucket0", num_fields: Optional[int] = None,
                 num_threads: Optional[int] = None):
        _check_algorithm(algorithm)
        if missing not in MISSING_MODES:
            raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
        minimum = 2 if missing == "bucket0" else 1
        self.algorithm, self.missing, self.num_threads = algorithm, missing, num_threads
        if isinstance(num_buckets, (int, np.integer)) and not isinstance(num_buckets, bool):
            self._buckets: Union[int, List[int]] = _check_buckets(num_buckets, minimum)
        else:
            self._buckets = [_check_buckets(b, minimum) for b in num_buckets]
            if not self._buckets:
                raise ValueError("num_buckets must name at least one field")
        if seeds is None or isinstance(seeds, (int, np.integer)):
            self._seeds: Union[int, List[int]] = 0 if seeds is None else _check_int("seeds", seeds)
        else:
            self._seeds = [_check_seed(s, algorithm) for s in seeds]
        sizes = [len(x) for x in (self._buckets, self._seeds) if isinstance(x, list)]
        if num_fields is not None:
            sizes.append(_check_int("num_fields", num_fields))
        if len(set(sizes)) > 1:
            raise ValueError(f"num_buckets, seeds and num_fields disagree on the number of fields: {sizes}")
        self._num_fields = sizes[0] if sizes else None
        if self._num_fields is not None:
            self._field_params(self._num_fields)  # checks every derived seed now

    @property
    def num_fields(self) -> Optional[int]:
        """F when fixed by the arguments, else None (any F is accepted)."""
        return self._num_fields

    def _field_params(self, num_fields: int) -> Tuple[List[int], List[int]]:
        if self._num_fields is not None and num_fields != self._num_fields:
            raise ValueError(f"expected {self._num_fields} columns, got {num_fields}")
        nb = self._buckets if isinstance(self._buckets, list) else [self._buckets] * num_fields
        seeds = (self._seeds if isinstance(self._seeds, list)
                 else [_check_seed(self._seeds + f, self.algorithm) for f in range(num_fields)])
        return nb, seeds

    @property
    def field_sizes(self) -> List[int]:
        """Ids per field (``num_buckets`` per field): field ``f``'s ids lie in ``[0, field_sizes[f])``."""
        if self._num_fields is None:
            raise ValueError("field_sizes needs the number of fields: pass num_buckets/seeds as lists or num_fields")
        return list(self._field_params(self._num_fields)[0])

    @property
    def offsets(self) -> List[int]:
        """Start of each field in one global table: ``offsets[f] = sum(field_sizes[:f])``."""
        sizes = self.field_sizes
        return [int(x) for x in np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)])] if sizes else []

    def __repr__(self) -> str:
        return (f"FeatureHasher(num_buckets={self._buckets!r}, seeds={self._seeds!r}, "
                f"algorithm={self.algorithm!r}, missing={self.missing!r})")

    @staticmethod
    def _split(columns: Any) -> List[Any]:
        mod = _module_of(columns)
        if mod == "pyarrow" and hasattr(columns, "columns"):  # Table / RecordBatch
            return list(columns.columns)
        if mod == "pandas" and hasattr(columns, "columns"):
            return [columns[c] for c in columns.columns]
        if mod == "polars" and hasattr(columns, "get_columns"):
            return list(columns.get_columns())
        if isinstance(columns, np.ndarray) or _is_torch(columns):
            if columns.ndim != 2:
                raise ValueError(f"expected a 2-D [N, F] array, got shape {tuple(columns.shape)}")
            return [columns[:, f] for f in range(columns.shape[1])]
        if isinstance(columns, dict):
            return list(columns.values())
        if isinstance(columns, (str, bytes)) or not hasattr(columns, "__iter__"):
            raise TypeError(f"expected a sequence of columns or a table, got {type(columns).__name__}")
        return list(columns)

    def transform(self, columns: Any, out: Any = None):
        """Hash ``F`` columns into per-field ids, all fields in one parallel pass.

        Args:
            columns: a sequence (or dict) of ``F`` columns as accepted by :func:`hash_strings` /
                :func:`hash_ints` (each column may be strings or int64), a pyarrow Table/RecordBatch,
                a pandas or polars DataFrame, or a 2-D numpy array / int64 tensor ``[N, F]``.
            out: optional int64 array/tensor ``[N, F]`` (C-contiguous rows not required) to fill.

        Returns:
            int64 ``[N, F]``: numpy, or a torch tensor (on the input's device) for tensor input.
        """
        cols_in = self._split(columns)
        if not cols_in:
            raise ValueError("transform() needs at least one column")
        nb, seeds = self._field_params(len(cols_in))
        mode = _MODE_BUCKET0 if self.missing == "bucket0" else _MODE_PLAIN
        cols = []
        for f, c in enumerate(cols_in):
            is_int = self._is_int_column(c)
            try:
                cols.append(_unpack(c, want_int=is_int))
            except TypeError as exc:
                raise TypeError(f"field {f}: {exc}") from None
        n = cols[0].n
        for f, c in enumerate(cols):
            if c.n != n:
                raise ValueError(f"field {f} has {c.n} rows, field 0 has {n}")
        F = len(cols)
        if any(c.cuda is not None for c in cols):
            return self._transform_cuda(cols, n, seeds, nb, mode, out)
        torch_out = any(_is_torch(c) for c in cols_in)
        if out is None:
            result = np.empty((n, F), dtype=np.int64)
            arr = result
        else:
            arr = out.numpy() if _is_torch(out) else out
            if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.shape != (n, F) or \
                    not arr.flags.writeable or arr.strides[0] % 8 or arr.strides[1] % 8:
                raise ValueError(f"out must be a writeable int64 array of shape ({n}, {F})")
            result = out
        _run_cpu(cols, [arr[:, f] for f in range(F)], seeds, nb, n, self.algorithm, mode, self.num_threads)
        if torch_out and out is None:
            import torch

            return torch.from_numpy(result)
        return result

    __call__ = transform

    @staticmethod
    def _is_int_column(c: Any) -> bool:
        """Integer columns hash as int64; everything else as strings (then type-checked per value)."""
        if _is_torch(c):
            return True
        if isinstance(c, np.ndarray):
            return c.dtype.kind in "iu"
        mod = _module_of(c)
        if mod == "pyarrow":
            return _arrow_is_int(c.type)
        if mod == "polars":
            return c.dtype.is_integer()
        if mod == "pandas":
            pa_type = getattr(c.dtype, "pyarrow_dtype", None)
            if pa_type is not None:
                return _arrow_is_int(pa_type)
            return getattr(c.dtype, "kind", "O") in "iu"  # numpy int64 and the masked Int64 alike
        return False

    def _transform_cuda(self, cols, n, seeds, num_buckets, mode, out):
        import torch

        if any(c.cuda is None for c in cols):
            raise TypeError("a CUDA column must come with CUDA columns only (all int64 tensors on one device)")
        dev = cols[0].cuda.device
        if any(c.cuda.device != dev for c in cols):
            raise ValueError("all CUDA columns must be on one device")
        F = len(cols)
        if out is None:
            out = torch.empty((n, F), dtype=torch.int64, device=dev)
        elif not _is_torch(out) or out.device != dev or out.dtype != torch.int64 or tuple(out.shape) != (n, F):
            raise ValueError(f"out must be an int64 tensor of shape [{n}, {F}] on {dev}")
        for f, c in enumerate(cols):
            # a column view of out: the kernel writes with stride out.stride(0)
            _run_cuda(c.cuda, out[:, f], seeds[f], num_buckets[f], self.algorithm, mode)
        return out


def _arrow_is_int(t) -> bool:
    if t is None:
        return False
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t)

"""Hashing inputs: any accepted column (Arrow, pandas, polars, numpy, torch, Python lists, Arrow-layout
string tensors) -> one :class:`_Column` of chunk descriptors the native engine reads in place, or the
values the pure-Python reference hashes. Used by :mod:`fastkd.hashing.engine` and
:mod:`fastkd.hashing.feature_hasher`.
"""
from __future__ import annotations

import sys
from typing import Any, List, Optional

import numpy as np

# chunk kinds understood by fastkd._hashing.hash_columns (csrc/hash_cpu.h)
_OFF32, _OFF64, _OBJ_SEQ, _INT64, _FIXED, _OBJ_ARRAY = 0, 1, 2, 3, 4, 5


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _module_of(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def _missing_singletons() -> tuple:
    pd = sys.modules.get("pandas")
    return (pd.NA, pd.NaT) if pd is not None else ()


class _Column:
    """One input column unpacked for the engine: chunk descriptors plus the objects that own the
    buffers they point into (kept alive until the call returns)."""

    __slots__ = ("chunks", "sources", "n", "keep", "is_int", "cuda")

    def __init__(self):
        self.chunks: List[tuple] = []
        self.sources: List[Any] = []  # per chunk, the Python-level values (for the pure-Python path)
        self.n = 0
        self.keep: List[Any] = []
        self.is_int = False
        self.cuda = None  # a CUDA int64 tensor, when the column lives on the GPU


def _arrow_chunks(col: _Column, arr, want_int: bool) -> None:
    import pyarrow as pa

    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), arr.type.value_type
    if want_int:
        if not pa.types.is_int64(t):
            raise TypeError(f"expected an int64 column, got Arrow {t}; cast it explicitly (the hash "
                            "depends on the byte width)")
    elif pa.types.is_null(t) or (hasattr(pa.types, "is_string_view") and
                                 (pa.types.is_string_view(t) or pa.types.is_binary_view(t))):
        arr = arr.cast(pa.large_binary())
        t = arr.type
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
              or pa.types.is_large_binary(t)):
        raise TypeError(f"expected a string or binary column, got Arrow {t}"
                        + ("; use hash_ints for integers" if pa.types.is_integer(t) else ""))
    n = len(arr)
    if n == 0:
        return
    bufs = arr.buffers()
    validity = bufs[0].address if (bufs[0] is not None and arr.null_count) else 0
    col.keep.append(arr)
    col.sources.append(arr)
    if want_int:
        col.chunks.append((_INT64, bufs[1].address + 8 * arr.offset, validity, arr.offset, n))
    else:
        wide = pa.types.is_large_string(t) or pa.types.is_large_binary(t)
        data = bufs[2].address if bufs[2] is not None else 0
        col.chunks.append((_OFF64 if wide else _OFF32, bufs[1].address + (8 if wide else 4) * arr.offset, data,
                           validity, arr.offset, n))
    col.n += n


def _numpy_chunks(col: _Column, a: np.ndarray, want_int: bool) -> None:
    if a.ndim != 1:
        raise ValueError(f"expected a 1-D column, got an array of shape {a.shape}")
    k = a.dtype.kind
    if want_int:
        if a.dtype != np.dtype(np.int64):
            raise TypeError(f"expected an int64 column, got numpy {a.dtype}; cast it explicitly (the hash "
                            "depends on the byte width)")
        a = np.ascontiguousarray(a)
        if len(a):
            col.chunks.append((_INT64, a.ctypes.data, 0, 0, len(a)))
            col.sources.append(a)
    elif k == "O":
        a = np.ascontiguousarray(a)
        if len(a):
            col.chunks.append((_OBJ_ARRAY, a.ctypes.data, len(a)))
            col.sources.append(a)
    elif k == "S":
        a = np.ascontiguousarray(a)
        if len(a):
            col.chunks.append((_FIXED, a.ctypes.data, a.dtype.itemsize, len(a)))
            col.sources.append(a)
    elif k == "U":  # UCS-4: re-encode as UTF-8 once (Arrow when present, else Python objects)
        try:
            import pyarrow as pa
        except ImportError:
            return _numpy_chunks(col, a.astype(object), want_int)
        return _arrow_chunks(col, pa.array(a, type=pa.large_string()), want_int)
    else:
        raise TypeError(f"expected a str/bytes/object column, got numpy {a.dtype}"
                        + ("; use hash_ints for integers" if k in "iu" else ""))
    col.keep.append(a)
    col.n += len(a)


def _unpack(values: Any, want_int: bool) -> _Column:
    """Turn any supported column into chunk descriptors (no copy for Arrow, numpy and lists)."""
    col = _Column()
    col.is_int = want_int
    if isinstance(values, (str, bytes, bytearray)):
        raise TypeError(f"expected a column of values, got a single {type(values).__name__}")
    if isinstance(values, (set, frozenset, dict)):
        # a set has no row order and a dict would hash its keys: neither gives ids aligned to rows
        raise TypeError(f"expected a column of values in row order, got a {type(values).__name__}")
    mod = _module_of(values)
    if _is_torch(values):
        import torch

        if values.dtype != torch.int64:
            raise TypeError(f"expected an int64 tensor, got {values.dtype}"
                            + ("" if want_int else "; strings cannot be tensors (see hash_string_tensors)"))
        if not want_int:
            raise TypeError("hash_strings got an int64 tensor; use hash_ints")
        if values.dim() != 1:
            raise ValueError(f"expected a 1-D tensor, got shape {tuple(values.shape)}")
        if values.is_cuda:
            col.cuda = values.contiguous()
            col.n = values.shape[0]
            return col
        if values.device.type != "cpu":
            raise TypeError(f"tensors on {values.device} are not supported (CPU or CUDA only)")
        _numpy_chunks(col, values.detach().contiguous().numpy(), want_int)
        return col
    if mod == "pyarrow":
        import pyarrow as pa

        if isinstance(values, pa.ChunkedArray):
            for chunk in values.chunks:
                _arrow_chunks(col, chunk, want_int)
            if not col.chunks and not want_int:  # type check even when empty
                _arrow_chunks(col, pa.array([], type=values.type), want_int)
            return col
        if isinstance(values, pa.Array):
            _arrow_chunks(col, values, want_int)
            return col
    if mod == "polars":
        return _unpack(values.to_arrow(), want_int)
    if mod == "pandas":
        arr = getattr(values, "array", None)
        if arr is not None and hasattr(arr, "__arrow_array__") and values.dtype != object:
            return _unpack(arr.__arrow_array__(), want_int)  # Arrow-backed: the buffers as they are
        if want_int:
            return _unpack(values.to_numpy(), want_int)
        return _unpack(values.to_numpy(dtype=object), want_int)
    if isinstance(values, np.ndarray):
        _numpy_chunks(col, values, want_int)
        return col
    if want_int:
        a = np.asarray(values)
        if a.dtype.kind not in "iu" or a.dtype == np.uint64:  # never parse "12" or 1.0 as an int
            raise TypeError(f"expected int64 values, got {a.dtype} (from {type(values).__name__})")
        _numpy_chunks(col, a.astype(np.int64), want_int)
        return col
    if not isinstance(values, (list, tuple)):
        if not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
            raise TypeError(f"expected a column (sequence) of strings, got {type(values).__name__}")
        values = list(values)
    if values:
        col.chunks.append((_OBJ_SEQ, values))
        col.sources.append(values)
        col.keep.append(values)
        col.n = len(values)
    return col


def _offsets_column(offsets, data) -> _Column:
    """Strings in Arrow layout held in contiguous CPU tensors (int32/int64 ``offsets [N + 1]``, uint8
    ``data``), already validated: one chunk the engine reads in place."""
    col = _Column()
    col.keep += [offsets, data]
    col.n = offsets.shape[0] - 1
    if col.n:
        wide = offsets.element_size() == 8
        col.chunks.append((_OFF64 if wide else _OFF32, offsets.data_ptr(), data.data_ptr(), 0, 0, col.n))
        col.sources.append((offsets, data))
    return col


def _ref_values(col: _Column, field: Optional[int] = None) -> List[Optional[bytes]]:
    """The column as Python bytes/None values (pure-Python path), type-checked like the engine."""
    where = "" if field is None else f"field {field}, "
    out: List[Optional[bytes]] = []
    missing = _missing_singletons()
    for ch, src in zip(col.chunks, col.sources):
        kind = ch[0]
        if kind == _INT64:
            if isinstance(src, np.ndarray):
                raw = src.astype("<i8").tobytes()
                out.extend(raw[i:i + 8] for i in range(0, len(raw), 8))
            else:  # Arrow int64, nulls kept as None
                out.extend(None if v is None else int(v).to_bytes(8, "little", signed=True) for v in src.to_pylist())
        elif kind in (_OFF32, _OFF64) and isinstance(src, tuple):  # (offsets, data) tensors
            o, raw = src[0].tolist(), bytes(src[1].tolist())
            out.extend(raw[o[i]:o[i + 1]] for i in range(len(o) - 1))
        elif kind in (_OFF32, _OFF64):
            import pyarrow as pa

            wide = kind == _OFF64
            out.extend(src.cast(pa.large_binary() if wide else pa.binary()).to_pylist())
        elif kind == _FIXED:
            out.extend(bytes(v) for v in src)  # numpy 'S' items drop trailing NULs, like the engine
        else:
            base = len(out)
            for i, v in enumerate(src):
                if isinstance(v, str):
                    try:
                        out.append(v.encode("utf-8"))
                    except UnicodeEncodeError:
                        raise ValueError(f"{where}row {base + i}: string cannot be encoded as UTF-8 "
                                         "(lone surrogate?)") from None
                elif isinstance(v, bytes):
                    out.append(bytes(v))
                elif v is None or (isinstance(v, float) and v != v) or any(v is m for m in missing):
                    out.append(None)
                else:
                    raise TypeError(f"{where}row {base + i}: expected str, bytes or None, got {type(v).__name__}")
    return out

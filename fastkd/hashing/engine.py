"""The hash functions over columns and the engines behind them: argument checks, the native CPU
engine (``fastkd._hashing``) or its pure-Python fallback, the CUDA launchers (``fastkd._hashing_cuda``).

The public names are re-exported by :mod:`fastkd.hashing` (see its docstring for the contract);
columns are unpacked by :mod:`fastkd.hashing._columns`, and the bucket rule (plain, or id 0 reserved
for missing values) from :func:`fastkd.reference.hashing.bucket_modulus` / ``bucket_id_ref``.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import numpy as np

from ..reference import hashing as _ref
from ._columns import _Column, _is_torch, _missing_singletons, _numpy_chunks, _offsets_column, _ref_values, _unpack
from .torch_op import register_hash_ints_op, to_i64

try:  # the CPU engine; absent when the package was installed without a C++ compiler
    from .. import _hashing as _C
except ImportError:  # pragma: no cover - exercised only on broken builds
    _C = None
try:  # the CUDA launchers; built only where nvcc was available. Importing touches no GPU.
    from .. import _hashing_cuda as _CUDA
except ImportError:
    _CUDA = None

__all__ = ["NATIVE", "NATIVE_CUDA", "ALGORITHMS", "MISSING_MODES", "hash_strings", "hash_ints",
           "hash_string_tensors"]

#: True when the native CPU extension is built (else a pure-Python loop gives the same ids).
NATIVE: bool = _C is not None
#: True when the CUDA launchers are built (else CUDA tensors are hashed on the CPU and copied back).
NATIVE_CUDA: bool = _CUDA is not None
#: Algorithm name -> (engine id, largest seed).
ALGORITHMS = {"xxh3": (0, 2**64 - 1), "murmur3": (1, 2**32 - 1)}
MISSING_MODES = ("bucket0", "hash")

_MAX_BUCKETS = 2**63
_MODE_PLAIN, _MODE_BUCKET0 = 0, 1


# ------------------------------------------------------------------ argument checks
def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _check_buckets(num_buckets: Any, minimum: int = 1) -> int:
    nb = _check_int("num_buckets", num_buckets)
    if nb < minimum or nb > _MAX_BUCKETS:
        raise ValueError(f"num_buckets must lie in [{minimum}, 2**63], got {nb}")
    return nb


def _check_algorithm(algorithm: str) -> int:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    return ALGORITHMS[algorithm][0]


def _check_seed(seed: Any, algorithm: str) -> int:
    s = _check_int("seed", seed)
    top = ALGORITHMS[algorithm][1]
    if not 0 <= s <= top:
        raise ValueError(f"seed for {algorithm} must lie in [0, {top}], got {s}")
    return s


def _threads(num_threads: Optional[int]) -> int:
    if num_threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    n = _check_int("num_threads", num_threads)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    return n


# ------------------------------------------------------------------ outputs
def _prepare_out(out: Any, n: int):
    """(numpy view to write, value to return) for a 1-D int64 out= of length n, or a fresh array."""
    if out is None:
        a = np.empty(n, dtype=np.int64)
        return a, a
    if _is_torch(out):
        import torch

        if out.device.type != "cpu":
            raise ValueError(f"out is on {out.device}, the input on the CPU")
        if out.dtype != torch.int64 or out.dim() != 1 or out.shape[0] != n:
            raise ValueError(f"out must be an int64 tensor of shape [{n}], got {out.dtype} {tuple(out.shape)}")
        return out.numpy(), out
    if not isinstance(out, np.ndarray) or out.dtype != np.int64 or out.ndim != 1 or len(out) != n:
        raise ValueError(f"out must be an int64 array of shape ({n},)")
    if not out.flags.writeable or out.strides[0] % 8:
        raise ValueError("out must be writeable with an element-aligned stride")
    return out, out


# ------------------------------------------------------------------ engines
def _run_cpu(cols: List[_Column], outs: List[np.ndarray], seeds: List[int], num_buckets: List[int], n: int,
             algorithm: str, mode: int, num_threads: Optional[int]) -> None:
    """Hash every column into its out view: one native call (one parallel region), or the Python loop.

    ``num_buckets[f]`` is field ``f``'s id count; ``mode`` says whether id 0 is reserved for missing
    values, and :func:`~fastkd.reference.hashing.bucket_modulus` turns both into the engine's divisor.
    """
    bucket0 = mode == _MODE_BUCKET0
    if _C is not None:
        specs = [(c.chunks, o.ctypes.data, o.strides[0] // 8, s, _ref.bucket_modulus(nb, bucket0))
                 for c, o, s, nb in zip(cols, outs, seeds, num_buckets)]
        _C.hash_columns(specs, n, ALGORITHMS[algorithm][0], mode, _threads(num_threads), _missing_singletons())
        return
    for f, (c, o, s, nb) in enumerate(zip(cols, outs, seeds, num_buckets)):
        o[:] = _ref.bucket_ids_ref(_ref_values(c, f if len(cols) > 1 else None), n, nb, s, algorithm, bucket0)


def _launch_cuda(device, launch) -> bool:
    """Run ``launch(stream)`` (a ``fastkd._hashing_cuda`` call) on ``device``'s current stream.

    Returns False, having queued nothing, when there is no CUDA build or it cannot run on this
    driver: the caller then hashes on the CPU (same ids) and copies the result back.
    """
    import torch

    if _CUDA is None or _CUDA_UNUSABLE:
        return False
    try:
        with torch.cuda.device(device):
            launch(torch.cuda.current_stream(device).cuda_stream)
        return True
    except RuntimeError as exc:
        if not _cuda_runtime_unusable(exc):
            raise
        return False


def _run_cuda(values, out, seed: int, num_buckets: int, algorithm: str, mode: int):
    """int64 CUDA tensor -> ids on the same device, queued on the current stream."""
    import torch

    dev = values.device
    modulus = _ref.bucket_modulus(num_buckets, mode == _MODE_BUCKET0)

    def launch(stream):
        _CUDA.hash_int64(values.data_ptr(), values.shape[0], out.data_ptr(), out.stride(0), seed, modulus,
                         ALGORITHMS[algorithm][0], mode, dev.index, stream)

    if _launch_cuda(dev, launch):
        return out
    # no (usable) CUDA build: hash on the CPU and copy back (synchronises); same ids
    ids = np.empty(values.shape[0], dtype=np.int64)
    col = _Column()
    _numpy_chunks(col, values.cpu().numpy(), True)
    _run_cpu([col], [ids], [seed], [num_buckets], len(ids), algorithm, mode, None)
    out.copy_(torch.from_numpy(ids))
    return out


_CUDA_UNUSABLE = False


def _cuda_runtime_unusable(exc: RuntimeError) -> bool:
    """True (and warn once) when the statically linked CUDA runtime cannot run on this driver."""
    global _CUDA_UNUSABLE
    if "insufficient" not in str(exc) and "no kernel image" not in str(exc):
        return False
    import warnings

    warnings.warn(f"fastkd: the CUDA hashing kernels cannot run here ({exc}); hashing CUDA tensors on the CPU "
                  "instead (same ids). Rebuild with a CUDA toolkit no newer than the driver.", RuntimeWarning)
    _CUDA_UNUSABLE = True
    return True


def _cuda_out(values, out):
    import torch

    n = values.shape[0]
    if out is None:
        return torch.empty(n, dtype=torch.int64, device=values.device)
    if not _is_torch(out) or out.device != values.device or out.dtype != torch.int64 or out.dim() != 1 \
            or out.shape[0] != n:
        raise ValueError(f"out must be an int64 tensor of shape [{n}] on {values.device}")
    return out


# ------------------------------------------------------------------ public functions
def hash_strings(values: Any, num_buckets: int, seed: int = 0, algorithm: str = "xxh3", out: Any = None,
                 num_threads: Optional[int] = None):
    """Bucket ids ``hash(utf8(v), seed) % num_buckets`` of a column of strings, exactly.

    Missing values (``None``, NaN, ``pandas.NA``, Arrow nulls) are hashed as the empty string; use
    :class:`FeatureHasher` (``missing="bucket0"``) to give them a reserved id instead.

    Args:
        values: a column of ``str``/``bytes``/missing values: pyarrow (chunked) string/binary array,
            pandas or polars Series, numpy object/``str``/``bytes`` array, list or tuple.
        num_buckets: ``1 <= num_buckets <= 2**63``.
        seed: ``[0, 2**64)`` for xxh3, ``[0, 2**32)`` for murmur3.
        algorithm: ``"xxh3"`` (``xxhash.xxh3_64_intdigest``) or ``"murmur3"``
            (``mmh3.hash(..., signed=False)``).
        out: optional int64 numpy array or CPU tensor of shape ``[N]`` (a strided column view is
            fine) to write into and return.
        num_threads: worker threads (default: the CPUs this process may use); the GIL is released.

    Returns:
        int64 numpy array ``[N]`` (or ``out``).

    Shape:
        ``values``: ``[N]``; output ``[N]`` with every id in ``[0, num_buckets)``.

    Example:
        >>> import xxhash
        >>> ids = hash_strings(["a", "héllo", None], 100)
        >>> ids.tolist() == [xxhash.xxh3_64_intdigest(v, 0) % 100 for v in (b"a", "héllo".encode(), b"")]
        True
    """
    nb = _check_buckets(num_buckets)
    _check_algorithm(algorithm)
    s = _check_seed(seed, algorithm)
    col = _unpack(values, want_int=False)
    view, result = _prepare_out(out, col.n)
    _run_cpu([col], [view], [s], [nb], col.n, algorithm, _MODE_PLAIN, num_threads)
    return result


def hash_ints(values: Any, num_buckets: int, seed: int = 0, algorithm: str = "xxh3", out: Any = None,
              num_threads: Optional[int] = None):
    """Bucket ids ``hash(int64_le_bytes(v), seed) % num_buckets`` of a column of int64 ids, exactly.

    CUDA tensors are hashed by the CUDA kernel on the current stream and the result stays on the
    device (without the CUDA build: on the CPU, then copied back). CPU/CUDA torch tensors without
    ``out=`` go through the ``torch.ops.fastkd.hash_ints`` custom op, so ``torch.compile`` can trace it.

    Args:
        values: int64 numpy array, torch tensor (CPU or CUDA), Arrow int64 array (nulls hashed as the
            empty string), or a list of Python ints. Other dtypes raise ``TypeError``.
        num_buckets: ``1 <= num_buckets <= 2**63``.
        seed: ``[0, 2**64)`` for xxh3, ``[0, 2**32)`` for murmur3.
        algorithm: ``"xxh3"`` or ``"murmur3"``.
        out: optional int64 array/tensor ``[N]`` (same device as ``values``) to write into and return.
        num_threads: CPU worker threads (default: the CPUs this process may use).

    Returns:
        int64 ids ``[N]``: a numpy array, or a tensor on ``values``' device for tensor input.

    Shape:
        ``values``: ``[N]``; output ``[N]``.

    Example:
        >>> import xxhash, numpy as np
        >>> hash_ints(np.array([5, -1]), 1000).tolist() == [
        ...     xxhash.xxh3_64_intdigest(v.to_bytes(8, "little", signed=True)) % 1000 for v in (5, -1)]
        True
    """
    nb = _check_buckets(num_buckets)
    _check_algorithm(algorithm)
    s = _check_seed(seed, algorithm)
    if _is_torch(values) and out is None and _TORCH_OP is not None:
        _check_int_tensor(values)  # errors raised here, not from inside the op; no numpy: traceable
        return _TORCH_OP(values, to_i64(nb), to_i64(s), ALGORITHMS[algorithm][0], _MODE_PLAIN)
    return _hash_ints_impl(values, nb, s, algorithm, _MODE_PLAIN, out, num_threads)


def _check_int_tensor(values) -> None:
    import torch

    if values.dtype != torch.int64:
        raise TypeError(f"expected an int64 tensor, got {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"expected a 1-D tensor, got shape {tuple(values.shape)}")
    if values.device.type not in ("cpu", "cuda"):
        raise TypeError(f"tensors on {values.device} are not supported (CPU or CUDA only)")


def _hash_ints_impl(values, num_buckets: int, seed: int, algorithm: str, mode: int, out=None, num_threads=None):
    col = _unpack(values, want_int=True)
    if col.cuda is not None:
        return _run_cuda(col.cuda, _cuda_out(col.cuda, out), seed, num_buckets, algorithm, mode)
    view, result = _prepare_out(out, col.n)
    _run_cpu([col], [view], [seed], [num_buckets], col.n, algorithm, mode, num_threads)
    if out is None and _is_torch(values):
        import torch

        return torch.from_numpy(result)
    return result


def hash_string_tensors(offsets, data, num_buckets: int, seed: int = 0, algorithm: str = "xxh3", out=None):
    """Hash strings stored Arrow-style in torch tensors, on the CPU or on a CUDA device.

    Value ``i`` is ``data[offsets[i]:offsets[i + 1]]`` -- the layout of an Arrow ``string`` /
    ``large_string`` array, so ``torch.from_numpy`` of its buffers (``.cuda()`` for the GPU) works.
    CPU and CUDA give identical ids.

    Args:
        offsets: int32 or int64 tensor ``[N + 1]``, non-decreasing, ``offsets[N] <= len(data)``.
        data: uint8 tensor of the concatenated UTF-8 bytes, on the same device.
        num_buckets, seed, algorithm: as in :func:`hash_strings`.
        out: optional int64 tensor ``[N]`` on the same device.

    Returns:
        int64 tensor ``[N]`` on the input device.

    Example:
        >>> import torch
        >>> offs = torch.tensor([0, 1, 3], dtype=torch.int32)
        >>> data = torch.tensor(list(b"abc"), dtype=torch.uint8)
        >>> hash_string_tensors(offs, data, 100).tolist() == hash_strings(["a", "bc"], 100).tolist()
        True
    """
    import torch

    nb = _check_buckets(num_buckets)
    algo = _check_algorithm(algorithm)
    s = _check_seed(seed, algorithm)
    if not (_is_torch(offsets) and _is_torch(data)):
        raise TypeError("offsets and data must be torch tensors")
    if offsets.dtype not in (torch.int32, torch.int64) or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise TypeError("offsets must be a 1-D int32/int64 tensor with N + 1 entries")
    if data.dtype != torch.uint8 or data.dim() != 1 or data.device != offsets.device:
        raise TypeError("data must be a 1-D uint8 tensor on the offsets' device")
    offsets, data = offsets.contiguous(), data.contiguous()
    n = offsets.shape[0] - 1
    if offsets.is_cuda:
        out = _cuda_out(offsets[:n], out)
        dev = offsets.device
        modulus = _ref.bucket_modulus(nb, False)

        def launch(stream):
            _CUDA.hash_offsets(offsets.data_ptr(), offsets.dtype == torch.int64, data.data_ptr(), 0, 0, n,
                               out.data_ptr(), out.stride(0), s, modulus, algo, _MODE_PLAIN, dev.index, stream)

        if not _launch_cuda(dev, launch):
            out.copy_(hash_string_tensors(offsets.cpu(), data.cpu(), nb, s, algorithm).to(out.device))
        return out
    # the CPU engine bounds-checks nothing: validate the offsets once (cheap next to hashing)
    if n and (bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[0]) < 0 or int(offsets[-1]) > data.shape[0]):
        raise ValueError("offsets must be non-decreasing and within data")
    result = out if out is not None else torch.empty(n, dtype=torch.int64)
    view, _ = _prepare_out(result, n)
    _run_cpu([_offsets_column(offsets, data)], [view], [s], [nb], n, algorithm, _MODE_PLAIN, None)
    return result


# ------------------------------------------------------------------ torch.library custom op
_ALGORITHM_NAMES = {i: name for name, (i, _) in ALGORITHMS.items()}
#: ``torch.ops.fastkd.hash_ints`` (None without ``torch.library.custom_op``), see :mod:`.torch_op`.
_TORCH_OP = register_hash_ints_op(
    lambda values, num_buckets, seed, algorithm, mode:
    _hash_ints_impl(values, num_buckets, seed, _ALGORITHM_NAMES[algorithm], mode))


def _hash_field(values: Any, num_buckets: int, seed: int, algorithm: str = "xxh3") -> np.ndarray:
    """One string column with ``missing="bucket0"`` semantics (the FeatureEncoder contract)."""
    nb = _check_buckets(num_buckets, 2)
    col = _unpack(values, want_int=False)
    ids = np.empty(col.n, dtype=np.int64)
    _run_cpu([col], [ids], [_check_seed(seed, algorithm)], [nb], col.n, algorithm, _MODE_BUCKET0, None)
    return ids


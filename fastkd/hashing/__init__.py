"""Sparse feature hashing: raw categorical values -> embedding ids, stable and bit-exact.

Two hashes, both pinned to their PyPI reference packages bit for bit:

* ``algorithm="xxh3"`` (default): XXH3-64 with a 64-bit seed, ``xxhash.xxh3_64_intdigest(data, seed)``;
* ``algorithm="murmur3"``: MurmurHash3 x86_32 with a 32-bit seed, ``mmh3.hash(data, seed, signed=False)``.

Strings are hashed as their UTF-8 bytes, ``bytes`` as they are (invalid UTF-8 included), int64 ids
as their 8 little-endian bytes. A bucket is exactly ``hash % num_buckets``.

The work is done by the native extension ``fastkd._hashing`` (C++, multi-threaded, GIL released,
Arrow buffers read in place) when it is built (:data:`NATIVE`), and by
``fastkd._hashing_cuda`` for int64 CUDA tensors (:data:`NATIVE_CUDA`; the output stays on the
device). Without the extension the same ids come from a pure-Python loop (:mod:`fastkd.reference.hashing`).

Accepted columns: pyarrow ``string``/``large_string``/``binary``/``large_binary`` (and view/dictionary
types, converted) arrays and chunked arrays, pandas Series (Arrow-backed ones read without a copy),
polars Series (via Arrow), numpy ``object``/``str``/``bytes`` arrays, Python lists/tuples of
``str``/``bytes``/``None``; for integers numpy/torch/Arrow int64 (no other integer dtype: hashing
int32 as 4 bytes or 8 is a choice the caller makes explicitly).

Example:
    >>> import numpy as np
    >>> from fastkd.hashing import hash_strings, hash_ints, FeatureHasher
    >>> import xxhash
    >>> ids = hash_strings(["apple", "pear", None], num_buckets=1000, seed=7)
    >>> int(ids[0]) == xxhash.xxh3_64_intdigest(b"apple", 7) % 1000
    True
    >>> hash_ints(np.array([1, 2, 3]), 10).shape
    (3,)
    >>> hasher = FeatureHasher([100, 50])
    >>> x = hasher.transform([["a", "", "b"], np.array([10, 11, 12])])
    >>> x.shape, x.dtype, int(x[1, 0])           # "" is missing -> id 0 of field 0
    ((3, 2), dtype('int64'), 0)
    >>> hasher.offsets
    [0, 100]

Layout (one module per concern):

* :mod:`fastkd.hashing.engine`: :func:`hash_strings`, :func:`hash_ints`, :func:`hash_string_tensors`
  and the CPU/CUDA engines behind them;
* :mod:`fastkd.hashing.feature_hasher`: :class:`FeatureHasher`;
* :mod:`fastkd.hashing.torch_op`: the ``torch.ops.fastkd.hash_ints`` custom op;
* ``fastkd.hashing._columns``: column unpacking (Arrow, pandas, polars, numpy, torch, lists);
* the bucket rule and the pure-Python oracle: :mod:`fastkd.reference.hashing`.
"""
from .engine import ALGORITHMS, MISSING_MODES, NATIVE, NATIVE_CUDA, hash_ints, hash_string_tensors, hash_strings
from .engine import _hash_field  # noqa: F401  (fastkd.data.encoder calls hashing._hash_field)
from .feature_hasher import FeatureHasher

__all__ = ["NATIVE", "NATIVE_CUDA", "ALGORITHMS", "MISSING_MODES", "hash_strings", "hash_ints", "hash_string_tensors",
           "FeatureHasher"]

"""Pure-Python reference for :mod:`fastkd.hashing`: the fallback when the native extension is not
built, and the oracle the native path is tested against.

Slow (a Python loop per value) but exact: XXH3-64 comes from the ``xxhash`` package (a fastkd
dependency), MurmurHash3 x86_32 from ``mmh3`` when installed, else from :func:`murmur3_32_ref` below.
The bucket rule is written here once for all of fastkd's Python side (C++: ``csrc/fastkd_hash.h``).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import xxhash

__all__ = ["murmur3_32_ref", "hash_bytes_ref", "bucket_modulus", "bucket_id_ref", "bucket_ids_ref"]

_M32 = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mixk(k: int) -> int:
    k = (k * 0xCC9E2D51) & _M32
    return (_rotl32(k, 15) * 0x1B873593) & _M32


def murmur3_32_ref(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86_32 of ``data`` as an unsigned int (equals ``mmh3.hash(data, seed, signed=False)``).

    Example:
        >>> murmur3_32_ref(b"hello", 0)
        613153351
    """
    h = seed & _M32
    n4 = len(data) // 4 * 4
    for i in range(0, n4, 4):
        h ^= _mixk(int.from_bytes(data[i:i + 4], "little"))
        h = (_rotl32(h, 13) * 5 + 0xE6546B64) & _M32
    tail = data[n4:]
    if tail:
        h ^= _mixk(int.from_bytes(tail, "little"))
    h ^= len(data) & _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _murmur3():
    try:
        import mmh3

        return lambda b, seed: mmh3.hash(b, seed, signed=False)
    except ImportError:
        return murmur3_32_ref


def hash_bytes_ref(data: bytes, seed: int, algorithm: str) -> int:
    """The unsigned hash of one byte string (``"xxh3"``: 64-bit, ``"murmur3"``: 32-bit)."""
    if algorithm == "xxh3":
        return xxhash.xxh3_64_intdigest(data, seed)
    return _murmur3()(data, seed)


def bucket_modulus(num_buckets: int, bucket0: bool) -> int:
    """The divisor (the native engines' ``modulus``): ``num_buckets - 1`` when id 0 is reserved (``bucket0``)."""
    return num_buckets - 1 if bucket0 else num_buckets


def bucket_id_ref(h: int, missing: bool, num_buckets: int, bucket0: bool) -> int:
    """The bucket id of one hash ``h`` (``missing``: the value was missing or empty).

    ``bucket0=False``: ``h % num_buckets`` (the caller hashed a missing value as ``b""``).
    ``bucket0=True``: missing -> 0, else ``1 + h % (num_buckets - 1)``.
    """
    if bucket0 and missing:
        return 0
    return int(bucket0) + h % bucket_modulus(num_buckets, bucket0)


def bucket_ids_ref(values: Iterable[Optional[bytes]], n: int, num_buckets: int, seed: int, algorithm: str,
                   bucket0: bool) -> np.ndarray:
    """Bucket ids of ``n`` byte strings (``None`` = missing), same contract as the native engine:
    :func:`bucket_id_ref` of each value's hash, a missing value hashed as ``b""``.
    """
    h = xxhash.xxh3_64_intdigest if algorithm == "xxh3" else _murmur3()
    it = (bucket_id_ref(h(v or b"", seed), not v, num_buckets, bucket0) for v in values)
    return np.fromiter(it, dtype=np.int64, count=n)

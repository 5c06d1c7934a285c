"""``torch.ops.fastkd.hash_ints``: integer hashing as a ``torch.library`` custom op.

:func:`fastkd.hashing.hash_ints` sends CPU and CUDA tensors (without ``out=``) through this op, so
``torch.compile`` traces it (``fullgraph=True`` included) instead of breaking the graph on numpy.

Schema ``(Tensor values, int num_buckets, int seed, int algorithm, int mode) -> Tensor``:
``algorithm`` and ``mode`` are the engine ids (``fastkd.hashing.ALGORITHMS[name][0]``; mode 0 plain,
1 id 0 reserved for missing values). Custom-op ints are signed 64-bit, so ``num_buckets`` and
``seed`` travel as the int64 with the same bits (:func:`to_i64`). The fake kernel returns an int64
tensor shaped like ``values``, so the op works under FakeTensor/meta tracing.
"""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["register_hash_ints_op", "to_i64"]

_M64 = 2**64 - 1


def to_i64(x: int) -> int:
    """uint64 -> the int64 with the same bits (custom-op ints are signed 64-bit).

    Example:
        >>> to_i64(2**64 - 1), to_i64(5)
        (-1, 5)
    """
    return x - 2**64 if x >= 2**63 else x


def register_hash_ints_op(impl: Callable) -> Optional[Callable]:
    """Register ``fastkd::hash_ints`` around ``impl(values, num_buckets, seed, algorithm, mode)``.

    ``impl`` gets ``num_buckets`` and ``seed`` back as unsigned ints and returns an int64 tensor on
    ``values``' device. Returns the op, or None where ``torch.library.custom_op`` is missing (torch < 2.4)
    or the op cannot be registered (e.g. already registered by a reloaded module).
    """
    try:
        import torch
        from torch.library import custom_op
    except ImportError:  # pragma: no cover - torch < 2.4
        return None

    try:
        # explicit schema: `from __future__ import annotations` hides the annotations' types
        @custom_op("fastkd::hash_ints", mutates_args=(),
                   schema="(Tensor values, int num_buckets, int seed, int algorithm, int mode) -> Tensor")
        def hash_ints_op(values, num_buckets, seed, algorithm, mode):
            return impl(values, num_buckets & _M64, seed & _M64, algorithm, mode)

        @hash_ints_op.register_fake
        def _(values, num_buckets, seed, algorithm, mode):
            return torch.empty_like(values, dtype=torch.int64)
    except Exception:  # pragma: no cover - e.g. the op already registered by a reloaded module
        return None
    return hash_ints_op

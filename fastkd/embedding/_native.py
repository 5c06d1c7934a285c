"""CPU fast path of :class:`fastkd.MultiFieldEmbedding`'s backward: the ``fastkd._embedding`` extension.

Same functions and results as :mod:`fastkd.reference.embedding` (the oracle): duplicate rows merged by
a stable sort and summed in lookup order; the fused SGD/Adagrad step on the touched rows. The
extension does both in one native pass (radix sort of 32-bit row ids, then each run of equal rows
summed into a scratch row and applied at once, the next runs' table rows prefetched), so the
fused step never builds the ``[U, D]`` merged gradient that the reference allocates. It uses
``torch.get_num_threads()`` threads and gives the same bits for any thread count.

Whatever the extension does not take (no build, non-fp32 tensors, tables of 2^32 rows or more,
autograd-tracked or non-contiguous inputs) goes to the reference, so callers never need to check.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..reference import embedding as embedding_ref

try:
    from .. import _embedding as _C
except ImportError:  # built without the extension (pure-Python install): the reference serves
    _C = None

__all__ = ["NATIVE", "embedding_merge_rows", "embedding_fused_update"]

#: True when the ``fastkd._embedding`` extension is built and imported.
NATIVE: bool = _C is not None

_LIMIT_32 = 2**32


def _takes(rows: torch.Tensor, grad_rows: torch.Tensor, *tables: Optional[torch.Tensor]) -> bool:
    if _C is None or rows.device.type != "cpu" or grad_rows.device.type != "cpu":
        return False
    if rows.dtype != torch.int64 or grad_rows.dtype != torch.float32 or grad_rows.dim() != 2:
        return False
    if rows.numel() >= _LIMIT_32 or rows.numel() != grad_rows.shape[0] or grad_rows.shape[1] == 0:
        return False
    for t in tables:
        if t is None:
            continue
        if (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
                or t.shape[0] > _LIMIT_32 or t.shape[1] != grad_rows.shape[1]):
            return False
    return True


def embedding_merge_rows(rows: torch.Tensor, grad_rows: torch.Tensor, deterministic: bool = False,
                         num_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`fastkd.reference.embedding.embedding_merge_rows_ref`, natively when it can."""
    if num_rows is None or not 0 < num_rows <= _LIMIT_32 or not _takes(rows, grad_rows):
        return embedding_ref.embedding_merge_rows_ref(rows, grad_rows, deterministic, num_rows)
    D = grad_rows.shape[1]
    rows, grad_rows = rows.contiguous(), grad_rows.contiguous()
    s = _C.sort_rows(rows.data_ptr(), rows.numel(), num_rows)
    out_rows = torch.empty(s.num_unique, dtype=torch.int64)
    out_merged = torch.empty(s.num_unique, D, dtype=torch.float32)
    s.merge(grad_rows.data_ptr(), D, out_rows.data_ptr(), out_merged.data_ptr(),
            torch.get_num_threads())
    return out_rows, out_merged


def embedding_fused_update(rows: torch.Tensor, grad_rows: torch.Tensor, weight: torch.Tensor,
                           state: Optional[torch.Tensor], optimizer: str, lr: float, eps: float,
                           deterministic: bool = False) -> None:
    """:func:`fastkd.reference.embedding.embedding_fused_update_ref`, natively when it can."""
    if optimizer not in ("sgd", "adagrad"):
        raise ValueError(f"optimizer must be 'sgd' or 'adagrad', got {optimizer!r}")
    if optimizer == "adagrad" and state is None:
        raise ValueError("optimizer 'adagrad' needs its state tensor")
    state = state if optimizer == "adagrad" else None
    if state is not None and (state.shape != weight.shape or state.device != weight.device):
        raise ValueError(f"the Adagrad state must match the weight: state {tuple(state.shape)} on "
                         f"{state.device}, weight {tuple(weight.shape)} on {weight.device}")
    if state is not None and weight.numel() and state.data_ptr() == weight.data_ptr():
        raise ValueError("the Adagrad state must not share memory with the weight")
    if not _takes(rows, grad_rows, weight, state) or weight.shape[0] == 0:
        return embedding_ref.embedding_fused_update_ref(rows, grad_rows, weight, state, optimizer,
                                                        lr, eps, deterministic)
    D = grad_rows.shape[1]
    rows, grad_rows = rows.contiguous(), grad_rows.contiguous()
    s = _C.sort_rows(rows.data_ptr(), rows.numel(), weight.shape[0])
    s.fused_update(grad_rows.data_ptr(), D, weight.data_ptr(),
                   0 if state is None else state.data_ptr(), float(lr), float(eps),
                   torch.get_num_threads())
    # written through raw pointers: bump the version counters as an in-place op would, so that
    # autograd still catches a later backward through a graph that saved the old table
    torch.autograd.graph.increment_version(weight if state is None else [weight, state])

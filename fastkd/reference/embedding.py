"""Plain-PyTorch twin of :mod:`fastkd.kernels.embedding`: the CPU path and the test oracle.

Same functions as the Triton launchers, with a ``_ref`` suffix, the same arguments and results.
These are also the fastest CPU formulations found for a training step of a multi-field table
(measured by ``bench/embedding_step.py``):

* the gather is one ``index_select`` of the flat row ids;
* duplicate rows are merged by a stable sort of the row ids (int32 keys when the table allows:
  about twice as fast as int64) and one ``F.embedding_bag(perm, grad_rows, run_starts)``, which
  sums each run of equal ids in sorted order. That is 2x faster on CPU than
  ``zeros(U, D).index_add_(0, inverse, grad_rows)`` at D = 16 and sums in the same order;
* optimizer steps touch the unique rows with ``index_select`` / ``index_copy_`` (safe since the
  rows are unique), several times faster than ``index_add_`` with ``alpha``.

Every reduction here runs in a fixed order, so the CPU path is deterministic.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "multi_field_embedding_forward_ref",
    "multi_field_embedding_bag_forward_ref",
    "embedding_dense_grad_ref",
    "embedding_merge_rows_ref",
    "embedding_fused_update_ref",
]

_INT32_MAX = 2**31 - 1
# Values per chunk of the CPU optimizer step (256 KiB of fp32 per temporary).
UPDATE_CHUNK_ELEMS = 1 << 16


def _fits_int32(num_rows: int, n: int) -> bool:
    return num_rows <= _INT32_MAX and n <= _INT32_MAX


def _gather(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 1-D ``idx``, by the fastest CPU kernel available.

    ``F.embedding_bag`` over bags of one row with int32 indices takes FBGEMM's JIT-compiled
    path on x86: 3x faster than ``index_select`` at D = 16 (and bit-identical: a one-term sum
    is a copy).
    """
    n = idx.numel()
    if (table.device.type == "cpu" and table.dtype == torch.float32 and n
            and _fits_int32(table.shape[0], n)):
        idx32 = idx.to(torch.int32)
        starts = torch.arange(n, dtype=torch.int32)
        # detach: embedding_bag picks its slower training kernel (which also builds the
        # bag bookkeeping for a backward) whenever the table requires grad, even under no_grad
        return F.embedding_bag(idx32, table.detach(), starts, mode="sum")
    return table.index_select(0, idx)


def multi_field_embedding_forward_ref(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``weight[rows]``: ``rows`` int64 of any shape -> ``[*rows.shape, D]``."""
    return _gather(weight, rows.reshape(-1)).view(*rows.shape, weight.shape[1])


def multi_field_embedding_bag_forward_ref(weight: torch.Tensor, values: torch.Tensor,
                                          starts: torch.Tensor,
                                          per_sample_weights: Optional[torch.Tensor],
                                          mean: bool) -> torch.Tensor:
    """Pooled bags ``[NB, D]``; bag ``b`` holds ``values[starts[b]:starts[b + 1]]``.

    Per-sample weights multiply each row before the sum (``mean`` is not allowed with them, as
    in ``F.embedding_bag``); an empty bag gives zeros.
    """
    return F.embedding_bag(values, weight, starts, mode="mean" if mean else "sum",
                           per_sample_weights=per_sample_weights, include_last_offset=True)


def embedding_dense_grad_ref(rows: torch.Tensor, grad_rows: torch.Tensor, num_rows: int,
                             dtype: torch.dtype, deterministic: bool = False) -> torch.Tensor:
    """Dense table gradient ``[num_rows, D]`` of lookups ``rows [N]`` with gradients ``grad_rows``."""
    out = torch.zeros(num_rows, grad_rows.shape[1], dtype=torch.float32, device=grad_rows.device)
    out.index_add_(0, rows, grad_rows.to(torch.float32))
    return out.to(dtype)


def _sort_runs(rows: torch.Tensor, num_rows: Optional[int]):
    # int32 keys sort about twice as fast as int64 on CPU, and int32 bag indices take FBGEMM's
    # fast embedding_bag path; row ids fit whenever the table has under 2^31 rows.
    small = (rows.device.type == "cpu" and num_rows is not None
             and _fits_int32(num_rows, rows.numel()))
    keys = rows.to(torch.int32) if small else rows
    sorted_keys, perm = torch.sort(keys, stable=True)
    unique, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    run_starts = torch.cumsum(counts, 0) - counts
    if small:
        perm, run_starts = perm.to(torch.int32), run_starts.to(torch.int32)
    return unique.to(torch.int64), perm, run_starts


def embedding_merge_rows_ref(rows: torch.Tensor, grad_rows: torch.Tensor,
                             deterministic: bool = False,
                             num_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Duplicates merged: ``(unique rows [U] int64 ascending, merged fp32 [U, D])``.

    Each unique row's gradient is the sum of its lookups' gradients, in lookup order.
    ``num_rows`` (the table's row count) lets the CPU path use 32-bit keys.

    Example:
        >>> import torch
        >>> rows, merged = embedding_merge_rows_ref(torch.tensor([5, 2, 5]), torch.ones(3, 2))
        >>> rows.tolist(), merged.tolist()
        ([2, 5], [[1.0, 1.0], [2.0, 2.0]])
    """
    D = grad_rows.shape[1]
    if rows.numel() == 0:
        return rows.new_empty(0), grad_rows.new_zeros(0, D, dtype=torch.float32)
    unique, perm, run_starts = _sort_runs(rows, num_rows)
    # embedding_bag over the gradient rows: bag u = the lookups of unique row u, in sorted order
    merged = F.embedding_bag(perm, grad_rows.to(torch.float32), run_starts, mode="sum")
    return unique, merged


def embedding_fused_update_ref(rows: torch.Tensor, grad_rows: torch.Tensor, weight: torch.Tensor,
                               state: Optional[torch.Tensor], optimizer: str, lr: float,
                               eps: float, deterministic: bool = False) -> None:
    """Apply ``optimizer`` ("sgd" | "adagrad") in place to the rows touched by ``rows [N]``.

    The step is torch's on the merged (coalesced) gradient ``g`` of each touched row:
    SGD ``w += -lr * g``; Adagrad ``s += g^2; w += -lr * (g / (sqrt(s) + eps))``. Computed in
    fp32 and stored back in the dtypes of ``weight`` / ``state``; only the ``U`` touched rows are
    read or written.

    Example:
        >>> import torch
        >>> w, s = torch.zeros(4, 1), torch.zeros(4, 1)
        >>> embedding_fused_update_ref(torch.tensor([1, 1, 3]), torch.ones(3, 1), w, s,
        ...                            "adagrad", lr=0.5, eps=0.0)
        >>> s.flatten().tolist(), w.flatten().tolist()
        ([0.0, 4.0, 0.0, 1.0], [0.0, -0.5, 0.0, -0.5])
    """
    if optimizer not in ("sgd", "adagrad"):
        raise ValueError(f"optimizer must be 'sgd' or 'adagrad', got {optimizer!r}")
    N, D = grad_rows.shape
    if N == 0 or D == 0:
        return
    unique, g = embedding_merge_rows_ref(rows, grad_rows, num_rows=weight.shape[0])
    # The step walks the unique rows in chunks of ~UPDATE_CHUNK_ELEMS values, so that its
    # temporaries (gathered state and rows, g^2, the quotient) stay in L2 instead of streaming
    # U x D arrays through memory several times: 1.3-2x faster on CPU at D = 64.
    U = unique.numel()
    step = max(1, UPDATE_CHUNK_ELEMS // D) if rows.device.type == "cpu" else U
    for a in range(0, U, step):
        _step_rows(weight, state, unique[a:a + step], g[a:a + step], optimizer, lr, eps)


def _step_rows(weight, state, rows, g, optimizer, lr, eps) -> None:
    if optimizer == "adagrad":
        s = _gather(state, rows).to(torch.float32)
        # g*g rounded, then added: torch's add_(g.pow(2)); addcmul_ would fuse into one FMA
        s.add_(g * g)
        state.index_copy_(0, rows, s.to(state.dtype))
        g.div_(s.sqrt_().add_(eps))
    w = _gather(weight, rows).to(torch.float32)
    w.add_(g, alpha=-lr)
    weight.index_copy_(0, rows, w.to(weight.dtype))

"""Fused multi-field embedding: one-launch gather / bag pooling, and its backward passes.

Twin of :mod:`fastkd.reference.embedding` (same launcher names without ``_ref``, same arguments,
same results up to summation order); :mod:`fastkd.embedding.ops` picks one or the other at a
single seam and registers each launcher as a ``torch.library`` op.
All fields live in one table ``weight [R, D]``; a lookup is a *row id* (per-field id + the field's
offset), so one launch serves every field. Tables may be fp32 or bf16: rows are loaded in their
native dtype and every sum and optimizer step is computed in fp32.

Backward works on ``(rows [N], grad_rows [N, D])``, the table row and upstream gradient of each
lookup (for bags, the pooled gradient already scaled per value). It produces one of:

* a dense ``[R, D]`` gradient;
* a sparse gradient with duplicate rows merged (``unique rows [U]``, ``merged [U, D]``);
* a fused SGD / Adagrad update of the touched rows, in place, without any ``[R, D]`` buffer.

Two ways to merge duplicates:

* atomic (default): every lookup adds its row into a slot with ``tl.atomic_add``. Work is even
  across programs whatever the id skew, but the float summation order varies from run to run.
* deterministic (sort-based): the row ids are stably sorted; the program at the head of each run
  of equal ids sums that run in sorted order. Bit-identical across runs; a very hot id (a field
  with two values) makes its head program loop over ~B lookups.

Nothing here touches CUDA at import; the kernels compile on first launch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Columns per program; wider embeddings use a second grid axis.
MAX_BLOCK_D = 128
# About this many elements per gather / scatter tile.
TILE_ELEMS = 4096
# Values per step of the bag-pooling loop.
BLOCK_V = 16

# Segment-kernel modes (what the head of a run of equal row ids does with the merged gradient).
STORE_SLOT = 0  # write it to out[slot]: sparse gradient
STORE_ROW = 1  # write it to out[row]: dense gradient
SGD = 2  # w[row] -= lr * g
ADAGRAD = 3  # s[row] += g^2; w[row] -= lr * g / (sqrt(s[row]) + eps)

_OPTIMIZERS = {"sgd": SGD, "adagrad": ADAGRAD}


@triton.jit
def _lookup_tile(index_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # This program's tile: lookups n [BLOCK_N] (grid axis 0) x columns cols [BLOCK_D] (axis 1),
    # its mask, and the int64 index (table row or slot) of each lookup.
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = n < N
    mask = nmask[:, None] & (cols < D)[None, :]
    index = tl.load(index_ptr + n, mask=nmask, other=0).to(tl.int64)
    return n, cols, mask, index


@triton.jit
def _item_columns(D, BLOCK_D: tl.constexpr):
    # For kernels with one item (a bag, a sorted position) per program on grid axis 0: that item,
    # and the columns [BLOCK_D] of grid axis 1 with their mask.
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return tl.program_id(0).to(tl.int64), cols, cols < D


@triton.jit
def _mfe_gather_kernel(
    out_ptr,  # [N, D] looked-up rows (weight dtype)
    weight_ptr,  # [R, D] fused table, row stride stride_w
    rows_ptr,  # [N] int64 table row of each lookup
    N,
    D,
    stride_w,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[n, :] = weight[rows[n], :]
    n, cols, mask, rows = _lookup_tile(rows_ptr, N, D, BLOCK_N, BLOCK_D)
    vals = tl.load(weight_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask)
    tl.store(out_ptr + n[:, None] * D + cols[None, :], vals, mask=mask)


@triton.jit
def _mfe_bag_fwd_kernel(
    out_ptr,  # [NB, D] pooled bags (weight dtype)
    weight_ptr,  # [R, D] fused table, row stride stride_w
    values_ptr,  # [NV] int64 table rows of all bags, bag after bag
    starts_ptr,  # [NB + 1] int64 bag b holds values[starts[b] : starts[b + 1]]
    psw_ptr,  # [NV] per-sample weights (read only when HAS_PSW)
    D,
    stride_w,
    MEAN: tl.constexpr,
    HAS_PSW: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[b] = sum_{j in bag b} psw[j] * weight[values[j]]   (/ |bag b| when MEAN; empty bag -> 0)
    bag, cols, cmask = _item_columns(D, BLOCK_D)
    start = tl.load(starts_ptr + bag)
    end = tl.load(starts_ptr + bag + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_V):
        j = j0 + tl.arange(0, BLOCK_V)
        vmask = j < end
        rows = tl.load(values_ptr + j, mask=vmask, other=0).to(tl.int64)
        w = tl.load(weight_ptr + rows[:, None] * stride_w + cols[None, :],
                    mask=vmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_PSW:
            w = w * tl.load(psw_ptr + j, mask=vmask, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(w, 0)
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + bag * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _mfe_scatter_add_kernel(
    dst_ptr,  # [S, D] fp32 accumulator (a dense gradient, or one slot per unique row)
    slots_ptr,  # [N] int64 destination slot of each lookup
    grad_ptr,  # [N, D] upstream gradient of each lookup
    N,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # dst[slots[n], :] += grad[n, :]   (atomic: summation order is not fixed)
    n, cols, mask, slots = _lookup_tile(slots_ptr, N, D, BLOCK_N, BLOCK_D)
    g = tl.load(grad_ptr + n[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(dst_ptr + slots[:, None] * D + cols[None, :], g, mask=mask)


@triton.jit
def _apply_update(weight_ptr, state_ptr, row, cols, cmask, g, stride_w, lr, eps,
                  OPTIMIZER: tl.constexpr):
    # Same operation order as torch.optim.SGD / Adagrad on a sparse gradient, with IEEE-rounded
    # division and square root, and launched with enable_fp_fusion=False so that s + g*g is not
    # contracted into one FMA (torch rounds g*g first):
    #   SGD:     w <- w + (-lr) * g
    #   Adagrad: s <- s + g^2;  w <- w + (-lr) * (g / (sqrt(s) + eps))
    w_ptrs = weight_ptr + row * stride_w + cols
    w = tl.load(w_ptrs, mask=cmask, other=0.0).to(tl.float32)
    if OPTIMIZER == 3:
        s_ptrs = state_ptr + row * stride_w + cols
        s = tl.load(s_ptrs, mask=cmask, other=0.0).to(tl.float32) + g * g
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=cmask)
        g = tl.div_rn(g, tl.sqrt_rn(s) + eps)
    w = w + (-lr) * g
    tl.store(w_ptrs, w.to(weight_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _mfe_segment_kernel(
    sorted_ptr,  # [N] int64 row ids, stably sorted
    perm_ptr,  # [N] int64 lookup index of each sorted position
    grad_ptr,  # [N, D] upstream gradient of each lookup (in lookup order)
    out_ptr,  # [S, D] fp32 merged gradients (STORE_SLOT: S = U; STORE_ROW: S = R)
    slot_ptr,  # [N] int64 slot of each sorted position (read only for STORE_SLOT)
    weight_ptr,  # [R, D] table updated in place (SGD / ADAGRAD), row stride stride_w
    state_ptr,  # [R, D] Adagrad sum of squared gradients, row stride stride_w (ADAGRAD)
    N,
    D,
    stride_w,
    lr,
    eps,
    MODE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The program at sorted position j works only if j heads a run of equal row ids:
    #   g = sum_{k in run} grad[perm[k]]   (summed in sorted order: deterministic)
    # then stores g (sparse / dense gradient) or applies the optimizer step to that row once.
    j, cols, cmask = _item_columns(D, BLOCK_D)
    row = tl.load(sorted_ptr + j)
    prev = tl.load(sorted_ptr + j - 1, mask=j > 0, other=-1)
    if row != prev:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        k = j
        nxt = row
        while nxt == row:
            i = tl.load(perm_ptr + k).to(tl.int64)
            acc += tl.load(grad_ptr + i * D + cols, mask=cmask, other=0.0).to(tl.float32)
            k += 1
            nxt = tl.load(sorted_ptr + k, mask=k < N, other=-1)
        if MODE == 0:
            slot = tl.load(slot_ptr + j).to(tl.int64)
            tl.store(out_ptr + slot * D + cols, acc, mask=cmask)
        elif MODE == 1:
            tl.store(out_ptr + row * D + cols, acc, mask=cmask)
        else:
            _apply_update(weight_ptr, state_ptr, row, cols, cmask, acc, stride_w, lr, eps, MODE)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), MAX_BLOCK_D)


def _tile(D: int) -> Tuple[int, int, int]:
    block_d = _block_d(D)
    block_n = max(1, min(128, TILE_ELEMS // block_d))
    return block_n, block_d, triton.cdiv(D, block_d)


def _num_warps(block_d: int) -> int:
    return 1 if block_d <= 32 else (2 if block_d <= 64 else 4)


def multi_field_embedding_forward(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``weight[rows]``: ``rows`` int64 of any shape -> ``[*rows.shape, D]``, one launch."""
    D = weight.shape[1]
    flat = rows.reshape(-1)
    N = flat.numel()
    out = weight.new_empty(N, D)
    if N and D:
        block_n, block_d, nd = _tile(D)
        _mfe_gather_kernel[(triton.cdiv(N, block_n), nd)](
            out, weight, flat, N, D, weight.stride(0), BLOCK_N=block_n, BLOCK_D=block_d)
    return out.view(*rows.shape, D)


def multi_field_embedding_bag_forward(weight: torch.Tensor, values: torch.Tensor,
                                      starts: torch.Tensor,
                                      per_sample_weights: Optional[torch.Tensor],
                                      mean: bool) -> torch.Tensor:
    """Pooled bags ``[NB, D]``; bag ``b`` holds ``values[starts[b]:starts[b + 1]]``."""
    D = weight.shape[1]
    NB = starts.numel() - 1
    out = weight.new_empty(NB, D)
    if NB and D:
        block_d = _block_d(D)
        psw = per_sample_weights if per_sample_weights is not None else values
        _mfe_bag_fwd_kernel[(NB, triton.cdiv(D, block_d))](
            out, weight, values, starts, psw, D, weight.stride(0),
            MEAN=bool(mean), HAS_PSW=per_sample_weights is not None,
            BLOCK_V=BLOCK_V, BLOCK_D=block_d, num_warps=_num_warps(block_d))
    return out


def _sorted_runs(rows: torch.Tensor):
    # Stable sort: equal ids keep lookup order, so the merged sums are reproducible.
    sorted_rows, perm = torch.sort(rows, stable=True)
    return sorted_rows, perm


def _segment(sorted_rows, perm, grad_rows, out, slot, weight, state, lr, eps, mode):
    N, D = grad_rows.shape
    block_d = _block_d(D)
    dummy = sorted_rows
    _mfe_segment_kernel[(N, triton.cdiv(D, block_d))](
        sorted_rows, perm, grad_rows,
        out if out is not None else grad_rows,
        slot if slot is not None else dummy,
        weight if weight is not None else grad_rows,
        state if state is not None else grad_rows,
        N, D, weight.stride(0) if weight is not None else D, float(lr), float(eps),
        MODE=mode, BLOCK_D=block_d, num_warps=_num_warps(block_d), enable_fp_fusion=False)


def _scatter_add(dst: torch.Tensor, slots: torch.Tensor, grad_rows: torch.Tensor) -> None:
    N, D = grad_rows.shape
    block_n, block_d, nd = _tile(D)
    _mfe_scatter_add_kernel[(triton.cdiv(N, block_n), nd)](
        dst, slots, grad_rows, N, D, BLOCK_N=block_n, BLOCK_D=block_d)


def embedding_dense_grad(rows: torch.Tensor, grad_rows: torch.Tensor, num_rows: int,
                         dtype: torch.dtype, deterministic: bool = False) -> torch.Tensor:
    """Dense table gradient ``[num_rows, D]`` (``dtype``) of lookups ``rows [N]``."""
    N, D = grad_rows.shape
    out = torch.zeros(num_rows, D, dtype=torch.float32, device=grad_rows.device)
    if N and D:
        if deterministic:
            sorted_rows, perm = _sorted_runs(rows)
            _segment(sorted_rows, perm, grad_rows, out, None, None, None, 0.0, 0.0, STORE_ROW)
        else:
            _scatter_add(out, rows, grad_rows)
    return out.to(dtype)


def embedding_merge_rows(rows: torch.Tensor, grad_rows: torch.Tensor,
                         deterministic: bool = False,
                         num_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Duplicates merged: ``(unique rows [U] int64 ascending, merged fp32 [U, D])``.

    ``num_rows`` is accepted for parity with the reference (which uses it to pick 32-bit keys).

    The output size is data-dependent, so this reads ``U`` on the host (one sync).
    """
    N, D = grad_rows.shape
    if N == 0:
        return rows.new_empty(0), grad_rows.new_zeros(0, D, dtype=torch.float32)
    sorted_rows, perm = _sorted_runs(rows)
    head = torch.ones_like(sorted_rows, dtype=torch.bool)
    head[1:] = sorted_rows[1:] != sorted_rows[:-1]
    slot = torch.cumsum(head, 0) - 1  # slot of each sorted position
    unique = sorted_rows[head]  # host sync: U
    merged = torch.zeros(unique.numel(), D, dtype=torch.float32, device=grad_rows.device)
    if D:
        if deterministic:
            _segment(sorted_rows, perm, grad_rows, merged, slot, None, None, 0.0, 0.0, STORE_SLOT)
        else:
            slot_of_lookup = torch.empty_like(slot).scatter_(0, perm, slot)
            _scatter_add(merged, slot_of_lookup, grad_rows)
    return unique, merged


def embedding_fused_update(rows: torch.Tensor, grad_rows: torch.Tensor, weight: torch.Tensor,
                           state: Optional[torch.Tensor], optimizer: str, lr: float, eps: float,
                           deterministic: bool = False) -> None:
    """Apply ``optimizer`` ("sgd" | "adagrad") in place to the rows touched by ``rows [N]``.

    Duplicates are merged first (the step is that of the summed gradient, as torch's optimizers
    do on a coalesced sparse gradient). The deterministic path needs no host sync; the atomic
    one reads the number of unique rows.
    """
    N, D = grad_rows.shape
    if N == 0 or D == 0:
        return
    opt = _OPTIMIZERS[optimizer]
    if opt == ADAGRAD and (state is None or state.stride(0) != weight.stride(0)):
        raise ValueError("adagrad needs a state tensor laid out like weight")
    if deterministic:
        sorted_rows, perm = _sorted_runs(rows)
        _segment(sorted_rows, perm, grad_rows, None, None, weight, state, lr, eps, opt)
        return
    # Atomic merge first; then the unique rows are runs of one, so the segment kernel applies
    # each row's step exactly once (acc = +0 + merged[u] = merged[u]: merged is never -0).
    unique, merged = embedding_merge_rows(rows, grad_rows, deterministic=False)
    one_run_each = torch.arange(unique.numel(), device=unique.device)
    _segment(unique, one_run_each, merged, None, None, weight, state, lr, eps, opt)

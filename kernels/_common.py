"""Device helpers shared by the loss kernels, and the deterministic partial-sum reduction.

Everything here is fp32 maths on values already upcast in registers. Nothing touches CUDA at
import; the kernels compile on first launch.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import torch
import triton
import triton.language as tl

# Elements per row tile: CTR rows hold one logit per teacher, so one row per program would leave
# the GPU idle on launch overhead. 3-D tiles (hidden vectors, classes) get more, over more warps.
ROW_TILE_ELEMS = 2048
WIDE_TILE_ELEMS = 8192
# Programs per SM for kernels that keep per-program partial sums: enough resident programs to
# hide memory latency, few enough that the partials stay a few hundred rows.
PROGRAMS_PER_SM = 4
# Programs on CPU tensors (the interpreter): small, so that tests walk several tiles per program.
INTERPRETER_PROGRAMS = 4
# Rows per program in the partial-sum reduction, columns per program.
REDUCE_BLOCK_P = 64
REDUCE_BLOCK_N = 128


@triton.jit
def softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): finite for any |x|. log1p by Kahan's trick
    # (log(v)·u/(v−1) with v = 1+u) because tl has no log1p and log(1+u) loses u when u < eps.
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    safe = tl.where(v == 1.0, 1.0, v - 1.0)
    lp = tl.where(v == 1.0, u, tl.log(v) * (u / safe))
    return tl.maximum(x, 0.0) + lp


@triton.jit
def sigmoid(x):
    # 1/(1+e^-x): e^-x = inf gives exactly 0, so |x| = 1e4 needs no special case
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def lse_update(m, l, x):
    """One step of the online log-sum-exp over the last axis of x [R, K] (masked lanes = -inf).

    Returns the new running max m [R] and the running sum l [R] of exp(x - m).
    """
    m_new = tl.maximum(m, tl.max(x, 1))
    l_new = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
    return m_new, l_new


@triton.jit
def _sum_partials_kernel(
    part_a_ptr,  # [P, NA] fp32 per-program partial sums (row p = program p of the loss kernel)
    out_a_ptr,  # [NA] fp32 column sums
    part_b_ptr,  # [P, NB] fp32 a second partials buffer, summed in the same launch
    out_b_ptr,  # [NB] fp32
    P,
    NA,
    NB,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Sums the rows in a fixed order (tiles of BLOCK_P rows, in sequence), with no atomics, so
    # the gate-parameter gradients are bit-identical from run to run. The first cdiv(NA, BLOCK_N)
    # programs take buffer a, the rest buffer b: one launch for dW and db.
    pid = tl.program_id(0)
    blocks_a = tl.cdiv(NA, BLOCK_N)
    # branch-free selection (masked loads touch no memory): a runtime `if` would need both
    # branches to agree on types, which Triton's specialisation of NA or NB == 1 breaks
    lane_pid = tl.zeros([BLOCK_N], dtype=tl.int32) + pid
    is_a = lane_pid < blocks_a
    cols = tl.where(is_a, lane_pid, lane_pid - blocks_a) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_a = is_a & (cols < NA)
    mask_b = (lane_pid >= blocks_a) & (cols < NB)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        rmask = rows[:, None] < P
        tile = tl.load(part_a_ptr + rows[:, None] * NA + cols[None, :], mask=rmask & mask_a[None, :], other=0.0)
        tile += tl.load(part_b_ptr + rows[:, None] * NB + cols[None, :], mask=rmask & mask_b[None, :], other=0.0)
        acc += tl.sum(tile, 0)
    tl.store(out_a_ptr + cols, acc, mask=mask_a)
    tl.store(out_b_ptr + cols, acc, mask=mask_b)


def sum_partials(part_a: torch.Tensor, part_b: torch.Tensor, wrap):
    """Deterministic column sums of two partials buffers [P, *S] -> [*S] (fp32), one launch.

    ``wrap`` as in :func:`register_op` (``None``: allocate only, launch nothing).
    """
    P = part_a.shape[0]
    out_a = part_a.new_empty(part_a.shape[1:])
    out_b = part_b.new_empty(part_b.shape[1:])
    if wrap is None:
        return out_a, out_b
    na, nb = out_a.numel(), out_b.numel()
    grid = (triton.cdiv(na, REDUCE_BLOCK_N) + triton.cdiv(nb, REDUCE_BLOCK_N),)
    wrap(_sum_partials_kernel)[grid](part_a, out_a, part_b, out_b, P, na, nb,
                                     BLOCK_P=REDUCE_BLOCK_P, BLOCK_N=REDUCE_BLOCK_N)
    return out_a, out_b


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))

# Test-only cap on rows per program (None: the tuned default). The interpreter tests lower it so
# that a small batch still spans several programs and exercises the partial-sum reduction.
MAX_BLOCK_B = None


def rows_per_program(elems_per_row: int, cap: int = 1024, tile_elems=None) -> int:
    """Rows per tile: about ``tile_elems`` elements, a power of two in [1, cap]."""
    block = max(1, min(cap, (tile_elems or ROW_TILE_ELEMS) // next_pow2(elems_per_row)))
    if MAX_BLOCK_B is not None:
        block = max(1, min(block, MAX_BLOCK_B))
    return 1 << (block.bit_length() - 1)  # round down to a power of two (tl.arange needs one)


_SM_COUNT = {}


def num_programs(tiles: int, device: torch.device) -> int:
    """Programs for ``tiles`` row tiles when each program keeps its own partial sums."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:  # a property read, not a sync; cached
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        cap = _SM_COUNT[index] * PROGRAMS_PER_SM
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(tiles, cap))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _plain_launch(kernel):
    return kernel


def run_op(op: Callable, launch: Callable, *args):
    """Run a registered op: through ``op`` (the torch op) under ``torch.compile`` or a dispatch
    mode (fake tensors, export, tracing), else straight through ``launch``.

    In plain eager mode both run the same launcher and kernels, but torch 2.11's custom-op
    dispatch costs ~0.6 ms of host time per call (an H200, cProfile:
    ``torch/_library/custom_ops.py backend_impl`` self time, 2026-11-28), more than the whole
    fused step takes on the GPU at B = 64K.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return op(*args)
    return launch(*args, wrap=_plain_launch)


def register_op(name: str, launch: Callable, signature: inspect.Signature):
    """Register ``launch(*args, wrap=...)`` as the torch op ``name``; returns the op.

    ``signature`` declares the arguments and outputs (the op schema is inferred from its
    annotations; :func:`fastkd.loss_args.op_signature` builds it from an argument dataclass).
    With compiled Triton the op is a ``torch.library.triton_op`` (``wrap`` = ``wrap_triton``), so
    ``torch.compile`` traces into the kernels without a graph break. Interpreted kernels cannot
    run on fake tensors, so under ``TRITON_INTERPRET=1`` the op is an opaque ``custom_op`` whose
    fake implementation allocates the outputs and launches nothing (``wrap=None``).
    """
    def bind(wrap):
        def fn(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            return launch(*bound.args, wrap=wrap)

        fn.__signature__ = signature
        fn.__name__ = name.split("::")[-1]
        return fn

    if interpreting():
        op = torch.library.custom_op(name, bind(_plain_launch), mutates_args=())
        op.register_fake(bind(None))
        return op
    return torch.library.triton_op(name, bind(torch.library.wrap_triton), mutates_args=())

"""torch.distributed plumbing for fastkd: process group set-up, sharding and collectives.

fastkd runs on PyTorch's own engine: launch with ``torchrun --nproc_per_node N`` (or any launcher
that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), call
:func:`init_process_group`, and the training loops in :mod:`fastkd.train` shard their work. Every
helper here degrades to the single-process answer when no process group is initialised, so code
written for N processes runs unchanged in one.

Conventions used by the training loops (see ``docs/distributed.md``):

* Training rows follow ``torch.utils.data.DistributedSampler``: every rank draws the same
  permutation (same seed and epoch), pads it by repeating its head to a multiple of the world
  size, and rank ``r`` takes positions ``r, r + W, r + 2W, ...`` (:func:`shard_permutation`).
* Scoring and cache building split rows into contiguous, nearly equal blocks
  (:func:`shard_bounds`, the ``numpy.array_split`` rule), so gathering the blocks in rank order
  (:func:`gather_rows`) restores the original row order.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import types
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "init_process_group", "destroy_process_group", "is_initialized", "get_rank", "get_world_size",
    "is_main_process", "launched_distributed", "default_backend", "barrier", "shard_bounds",
    "shard_permutation", "block_order", "gather_rows", "all_gather_object", "gather_object", "broadcast_object",
    "all_gather_uneven", "all_reduce_sum",
    "broadcast_float", "broadcast_buffers", "sync_batch_norm", "rank_seed", "free_port",
]


def is_initialized() -> bool:
    """True when a default process group exists (``torch.distributed`` is available and set up)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints."""
    return get_rank() == 0


def launched_distributed() -> bool:
    """True when a launcher such as torchrun started this process as one of several
    (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_backend() -> str:
    """``"gloo"`` on a CPU-only machine; with CUDA, gloo for CPU tensors and nccl for CUDA ones.

    fastkd's loops keep their tensors where the model is; a two-backend group lets the same
    collectives serve CPU tensors (gloo) and CUDA tensors (nccl) without the caller choosing.
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: Optional[str] = None, *, rank: Optional[int] = None,
                       world_size: Optional[int] = None, timeout_s: Optional[float] = None) -> bool:
    """Join the default process group described by the environment (torchrun's ``env://``).

    Args:
        backend: torch.distributed backend; default :func:`default_backend`.
        rank, world_size: override ``RANK`` / ``WORLD_SIZE`` from the environment.
        timeout_s: seconds a rank waits for its peers, at the rendezvous (the ``env://`` store)
            and in every collective, before it fails; passed to torch as a ``datetime.timedelta``
            (None: torch's default, 30 minutes; ``fastkd`` CLI: ``--dist-timeout``, default 1800).
            A peer that dies is usually noticed at once (its sockets close); the timeout bounds
            the other cases, such as a peer that never starts.

    Returns:
        True if this call created the group, False if one already existed or ``WORLD_SIZE`` is 1
        (then nothing is set up and every helper here answers as for a single process).

    Example::

        >>> from fastkd import distributed
        >>> distributed.init_process_group(world_size=1)  # one process: nothing to set up
        False
        >>> distributed.get_rank(), distributed.get_world_size()
        (0, 1)
    """
    if timeout_s is not None and not 0 < timeout_s < float("inf"):  # NaN fails too
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if is_initialized():
        return False
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    if world <= 1:
        return False
    rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
    backend = backend or default_backend()
    if "nccl" in backend:
        # one device per local process; set before the group so nccl binds the right one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kw)
    return True


def destroy_process_group() -> None:
    """Leave the default group if there is one (safe to call in a single process)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def shard_bounds(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` owns: contiguous blocks in rank order, the
    first ``n % world_size`` ranks one row longer (``numpy.array_split``'s rule).

    Example::

        >>> [shard_bounds(10, r, 3) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
        >>> shard_bounds(5)  # single process: everything
        (0, 5)
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_permutation(perm: torch.Tensor, rank: Optional[int] = None,
                      world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's share of an epoch's permutation, as ``DistributedSampler`` deals it.

    The permutation is padded by repeating its head to a multiple of ``world_size`` (so every
    rank runs the same number of steps, which DDP needs), and rank ``r`` takes ``r::world_size``.
    With a global batch ``B`` cut into per-rank batches of ``B / W`` rows, step ``k``'s rows over
    all ranks are exactly positions ``[kB, (k+1)B)`` of the (padded) permutation: the batches a
    single process would see.

    Shape:
        - perm: ``[N]``
        - output: ``[ceil(N / W)]``

    Example::

        >>> shard_permutation(torch.tensor([4, 0, 3, 1, 2]), 1, 2)
        tensor([0, 1, 4])
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    pad = (-perm.shape[0]) % world
    if pad:
        perm = torch.cat([perm, perm[:pad]])
    return perm[rank::world]


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's block of rows (cut by :func:`shard_bounds` of ``n``) in rank order.

    The result is the same tensor on every rank: rows ``[0, n)`` in their original order.

    Shape:
        - local: ``[stop - start, *]`` this rank's rows
        - output: ``[n, *]``

    Example::

        >>> gather_rows(torch.arange(3.0), 3)  # single process: the input itself
        tensor([0., 1., 2.])
    """
    world = get_world_size()
    if world == 1:
        return local
    longest = shard_bounds(n, 0, world)
    rows = longest[1] - longest[0]
    # all_gather needs equal shapes: pad the short blocks to the longest, cut after
    padded = local.new_zeros((rows,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = []
    for r, part in enumerate(parts):
        a, b = shard_bounds(n, r, world)
        out.append(part[: b - a])
    return torch.cat(out)


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process).

    For small things (names, counts, errors, chunk positions); tensors of data go through
    :func:`all_gather_uneven`.
    """
    world = get_world_size()
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's picklable ``obj`` in rank order on rank ``dst``, ``None`` on the others
    (``[obj]`` in a single process). Only ``dst`` holds all of them, unlike :func:`all_gather_object`."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: Optional[List[Any]] = [None] * world if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_uneven(local: torch.Tensor) -> List[torch.Tensor]:
    """Every rank's ``local`` tensor in rank order, where the first dimension may differ by rank.

    The other dimensions and the dtype must agree. One small collective exchanges the lengths,
    then one ``all_gather`` moves the rows (each rank's block padded to the longest).

    Shape:
        - local: ``[n_r, *]`` on rank ``r``
        - output: ``W`` tensors ``[n_0, *] ... [n_{W-1}, *]``
    """
    world = get_world_size()
    if world == 1:
        return [local]
    lengths = torch.zeros(world, dtype=torch.int64)
    lengths[get_rank()] = local.shape[0]
    dist.all_reduce(lengths, op=dist.ReduceOp.SUM)
    longest = int(lengths.max())
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return [part[: int(n)] for part, n in zip(parts, lengths)]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself in a single process)."""
    if get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_float(value: float, src: int = 0) -> float:
    """Rank ``src``'s ``value`` on every rank: decisions taken from it (early stopping, learning
    rate cuts) are then the same everywhere by construction, not by floating-point luck."""
    if get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=src)
    return float(t.item())


def broadcast_buffers(modules: Iterable[torch.nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) into every rank's modules.

    DDP synchronises parameters through their gradients, but BatchNorm updates its running
    statistics from each rank's own batch; after the last step of an epoch they differ by rank.
    Broadcasting them makes every rank evaluate (and checkpoint) rank ``src``'s model.
    """
    if get_world_size() == 1:
        return
    for m in modules:
        for buf in m.buffers():
            dist.broadcast(buf.data, src=src)


class _SyncBatchNorm1dFunction(torch.autograd.Function):
    """Training-mode ``BatchNorm1d`` over ``[N, C]`` given the statistics of the batch of all
    ranks (``mean``, ``invstd``, total rows ``n``; see :func:`_sync_bn_forward`).

    Backward all-reduces the per-channel sums of dy and dy·x̂ that the input gradient needs. The
    weight and bias gradients stay this rank's own sums: DDP averages them over ranks, which
    (each rank's loss being the mean over its share of the global batch) gives the
    single-process gradient, as torch's CUDA ``SyncBatchNorm`` does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, n):
        xhat = (x.float() - mean) * invstd
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n = n
        return xhat * weight + bias if weight is not None else xhat

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        dy = dy.float()
        local = torch.cat([dy.sum(0), (dy * xhat).sum(0)])
        sums = local.double()
        dist.all_reduce(sums)
        C = xhat.shape[1]
        mean_dy, mean_dy_xhat = (sums[:C] / ctx.n).float(), (sums[C:] / ctx.n).float()
        scale = invstd if weight is None else invstd * weight
        dx = scale * (dy - mean_dy - xhat * mean_dy_xhat)
        if weight is None:
            return dx, None, None, None, None, None
        return dx, local[C:], local[:C], None, None, None


def _sync_bn_forward(self: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    if not self.training or x.dim() != 2:
        return type(self).forward(self, x)
    with torch.no_grad():
        x32 = x.float()
        stats = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_tensor([x32.shape[0]])]).double()
        dist.all_reduce(stats)
        C = x32.shape[1]
        n = float(stats[-1])
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            unbiased = var * (n / max(n - 1.0, 1.0))
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        invstd = (var + self.eps).rsqrt().float()
    return _SyncBatchNorm1dFunction.apply(x, self.weight, self.bias, mean.float(), invstd, n)


@contextlib.contextmanager
def sync_batch_norm(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Within the block, every ``BatchNorm1d`` in ``modules`` normalises a training batch with
    the statistics of the global batch (all ranks' rows), as one process would, and updates its
    running statistics from them; outside it the modules are untouched.

    torch's ``nn.SyncBatchNorm`` takes CUDA tensors only; this covers the CPU (gloo) runs of
    fastkd's loops, for the ``[N, C]`` inputs of an MLP. Other inputs, eval mode and a single
    process run the plain layer. Every rank must run the same BatchNorm layers in the same order.
    """
    patched = []
    if get_world_size() > 1:
        for mod in modules:
            for m in mod.modules():
                # CUDA modules are left to torch's own nn.SyncBatchNorm (fastkd's loops run on CPU)
                if (type(m) is torch.nn.BatchNorm1d and "forward" not in m.__dict__
                        and all(p.device.type == "cpu" for p in m.parameters())):
                    m.forward = types.MethodType(_sync_bn_forward, m)
                    patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def block_order(n: int, blocks: int, seed: int, epoch: int, rank: Optional[int] = None) -> torch.Tensor:
    """One epoch's order of ``n`` rows cut into ``blocks`` contiguous blocks
    (:func:`shard_bounds`), each permuted on its own (``TrainConfig.row_blocks``).

    Row ``k`` of the output is block ``k``'s permutation (row indices into all ``n`` rows), padded
    by repeating its head to the longest block's length, so every block gives the same number of
    batches (DDP needs as many steps on every rank). ``rank=None``: every block (one process);
    ``rank=r``: block ``r`` alone (the rank's own rows: no other block's index is made). Each
    block's permutation comes from ``(seed, epoch, block)`` alone, so ranks need not share a
    generator and a resumed run draws the same order.

    Shape:
        - output: ``[blocks, ceil(n / blocks)]``, or ``[1, ceil(n / blocks)]`` with ``rank``

    Example::

        >>> order = block_order(5, 2, seed=0, epoch=0)
        >>> order.shape, sorted(order[0].tolist()), sorted(set(order[1].tolist()))
        (torch.Size([2, 3]), [0, 1, 2], [3, 4])
    """
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= max(n, 1):
        raise ValueError(f"cannot cut {n} rows into {blocks!r} non-empty blocks")
    longest = -(-n // blocks)
    dtype = torch.int32 if n < 2**31 else torch.int64
    out = []
    for r in range(blocks) if rank is None else [rank]:
        a, b = shard_bounds(n, r, blocks)
        g = torch.Generator().manual_seed(rank_seed(seed, epoch, r) ^ 0x5DEECE66D)
        perm = torch.randperm(b - a, generator=g, dtype=dtype) + a
        if perm.shape[0] < longest:
            perm = torch.cat([perm, perm[:longest - perm.shape[0]]])
        out.append(perm)
    return torch.stack(out)


def rank_seed(seed: int, epoch: int, rank: Optional[int] = None) -> int:
    """Seed of a rank's own random stream (dropout) for one epoch.

    Derived from ``(seed, epoch, rank)`` rather than carried over in a checkpoint, so that ranks
    draw different dropout masks and a resumed run draws the masks an uninterrupted one would.

    Example::

        >>> rank_seed(0, 1, 0) != rank_seed(0, 1, 1)
        True
    """
    rank = get_rank() if rank is None else rank
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + 17) % (2**63)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (for ``MASTER_PORT`` in tests and
    single-machine launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

"""The multi-field embedding op: validation, the one CPU/Triton dispatch seam (:func:`_impl`),
:class:`MultiFieldEmbeddingFunction` and its functional twin :func:`multi_field_embedding`.

The modules built on it (:class:`~fastkd.embedding.MultiFieldEmbedding` and the per-field
reference :class:`~fastkd.embedding.MultiFieldEmbeddingRef`) live in :mod:`fastkd.embedding`,
which re-exports the names here; see its docstring for the design.
"""
from __future__ import annotations

import types
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _embedding_native, embedding_ref
from ._autograd import forced_backend

__all__ = ["MultiFieldEmbeddingFunction", "multi_field_embedding", "NATIVE_CPU", "DEFAULT_INIT_STD"]

#: True when the native CPU backward (``fastkd._embedding``) is built; without it the CPU path
#: is the plain-PyTorch reference, with the same results.
NATIVE_CPU: bool = _embedding_native.NATIVE

# CTR embeddings are conventionally initialised close to zero (N(0, 1e-4) is the common default
# in CTR benchmark suites such as FuxiCTR/BARS). Tiny rows make second-order terms (FM, CIN, cross
# layers) start near zero, so every model begins almost as its linear / MLP part and interaction
# terms grow only as the data supports them. Adam's update size does not depend on the parameter
# scale, so the small start does not slow learning (rows reach O(lr) after one step).
DEFAULT_INIT_STD = 1e-4

_MODES = ("onehot", "bag")
_POOLINGS = ("sum", "mean")
_OPTIMIZERS = ("sgd", "adagrad")
_BACKENDS = ("auto", "triton", "torch")
# torch.optim's defaults, so `fused_optimizer="adagrad"` alone behaves like `Adagrad(params)`.
_DEFAULT_LR = {"sgd": 1e-3, "adagrad": 1e-2}
_LAUNCHERS = (
    "multi_field_embedding_forward",
    "multi_field_embedding_bag_forward",
    "embedding_dense_grad",
    "embedding_merge_rows",
    "embedding_fused_update",
)


# ------------------------------------------------------------------------------------------------
# The dispatch seam
# ------------------------------------------------------------------------------------------------
def _load_kernels():
    """The Triton launchers, or ``None`` when Triton does not import (tests swap this out)."""
    try:
        from .kernels import embedding as kernels
    except ImportError:
        return None
    return kernels


_REF_IMPL = types.SimpleNamespace(**{n: getattr(embedding_ref, n + "_ref") for n in _LAUNCHERS})
# The CPU path: the reference, with the sparse and fused backward done natively where it can
# (each native function hands what it does not take back to the reference).
_CPU_IMPL = types.SimpleNamespace(**{
    n: getattr(_embedding_native, n, None) or getattr(embedding_ref, n + "_ref") for n in _LAUNCHERS})


def _impl(device: torch.device, backend: str, dtype: Optional[torch.dtype] = None):
    """The single place where the embedding's implementation is chosen.

    ``"auto"``: Triton for CUDA tensors when it imports, the CPU path otherwise (the reference
    plus the native sparse/fused backward; the plain reference for float64 CUDA tables: the
    kernels compute in float32); the environment variable ``FASTKD_BACKEND=torch|triton``
    overrides ``"auto"`` as it does for the losses. ``"triton"`` forces the kernels (on CPU
    tensors only under ``TRITON_INTERPRET=1``, as the tests do); ``"torch"`` forces the pure
    PyTorch reference. All namespaces expose the same launcher names.
    """
    if backend == "auto":
        forced = forced_backend()
        if forced:
            backend = forced
        elif device.type != "cuda":
            return _CPU_IMPL
        elif dtype == torch.float64:
            return _REF_IMPL
    if backend == "torch":
        return _REF_IMPL
    kernels = _load_kernels()
    if kernels is None:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package")
        return _REF_IMPL
    return types.SimpleNamespace(**{n: getattr(kernels, n) for n in _LAUNCHERS})


def _deterministic(flag: bool) -> bool:
    return bool(flag) or torch.are_deterministic_algorithms_enabled()


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _check_field_sizes(field_sizes: Iterable[int]) -> Tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in field_sizes)
    except TypeError as exc:  # e.g. a bare int
        raise TypeError(f"field_sizes must be a sequence of ints, got {field_sizes!r}") from exc
    if len(sizes) == 0:
        raise ValueError("field_sizes must name at least one field")
    for f, s in enumerate(sizes):
        if s <= 0:
            raise ValueError(f"field_sizes[{f}] must be positive, got {s}")
    return sizes


def _check_dim(dim: int) -> int:
    if int(dim) != dim or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return int(dim)


def _validate_ids(ids: torch.Tensor, field_sizes: Sequence[int], sizes_t: torch.Tensor) -> None:
    """Shape/dtype/range checks shared by the fused and reference embeddings."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 (or int32) tensor, got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[1] != len(field_sizes):
        raise ValueError(
            f"ids must have shape [B, {len(field_sizes)}] (one column per field), "
            f"got {tuple(ids.shape)}"
        )
    # The range check reads the data on the host: free for CPU tensors, but a device sync for
    # CUDA tensors and a graph break under torch.compile, so it is skipped there (an out-of-range
    # id then surfaces as the backend's own index error, or a device-side assert on CUDA).
    if ids.device.type != "cpu" or ids.shape[0] == 0 or torch.compiler.is_compiling():
        return
    lo = ids.amin(dim=0)
    hi = ids.amax(dim=0)
    bad = (lo < 0) | (hi >= sizes_t)
    if bool(bad.any()):
        f = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"ids for field {f} must lie in [0, {field_sizes[f]}), "
            f"got values in [{int(lo[f])}, {int(hi[f])}]"
        )


def _as_field_list(x, name: str, num_fields: int) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list of {num_fields} 1-D tensors (one per field), "
                        f"got {type(x).__name__}")
    if len(x) != num_fields:
        raise ValueError(f"{name} must hold one tensor per field ({num_fields}), got {len(x)}")
    for f, t in enumerate(x):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name}[{f}] must be a 1-D tensor")
    return list(x)


def _validate_bags(values: List[torch.Tensor], offsets: List[torch.Tensor],
                   psw: Optional[List[torch.Tensor]], field_sizes: Sequence[int]) -> int:
    """Checks of bag-mode inputs; returns the batch size ``B``. Range checks on CPU only."""
    batch = offsets[0].numel()
    for f, (v, o) in enumerate(zip(values, offsets)):
        if v.dtype not in (torch.int64, torch.int32) or o.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"values[{f}] and offsets[{f}] must be int64 (or int32) tensors")
        if o.numel() != batch:
            raise ValueError(f"offsets[{f}] has {o.numel()} bags, offsets[0] has {batch}: every "
                             "field needs one bag per sample")
        if psw is not None and (psw[f].numel() != v.numel() or not psw[f].is_floating_point()):
            raise ValueError(f"per_sample_weights[{f}] must be a float tensor shaped like values[{f}]")
        if v.device.type != "cpu" or torch.compiler.is_compiling():
            continue
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= field_sizes[f]):
            raise ValueError(f"values for field {f} must lie in [0, {field_sizes[f]}), "
                             f"got values in [{int(v.min())}, {int(v.max())}]")
        if batch and (int(o[0]) != 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) > v.numel()):
            raise ValueError(f"offsets[{f}] must start at 0, be non-decreasing and stay within "
                             f"values[{f}] (bag b is values[offsets[b]:offsets[b + 1]])")
    return batch


# ------------------------------------------------------------------------------------------------
# autograd.Function
# ------------------------------------------------------------------------------------------------
def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("MultiFieldEmbedding does not support double backward (create_graph=True)")


class MultiFieldEmbeddingFunction(torch.autograd.Function):
    """Lookup (or bag pooling) of table rows; backward to a dense or merged-sparse gradient, or
    a fused optimizer step applied to the touched rows in place.

    Arguments of ``apply``: ``weight [R, D]``; ``rows`` int64 table rows (any shape for one-hot,
    ``[NV]`` for bags); ``starts`` ``[NB + 1]`` int64 bag boundaries or ``None`` (one-hot);
    ``per_sample_weights [NV]`` or ``None``; ``state [R, D]`` (Adagrad) or ``None``; then the
    Python options ``grad`` ("dense" | "sparse" | "sgd" | "adagrad"), ``mean``, ``lr``, ``eps``,
    ``deterministic``, ``backend``.

    With a fused optimizer the weight's gradient is ``None`` (its update already happened), so an
    outer ``torch.optim`` optimizer that also holds the table skips it. Backward may run once per
    forward: a second pass (``retain_graph=True``) would apply the update twice and raises.
    """

    @staticmethod
    def forward(ctx, weight, rows, starts, per_sample_weights, state, grad, mean, lr, eps,
                deterministic, backend):
        impl = _impl(weight.device, backend, weight.dtype)
        if starts is None:
            out = impl.multi_field_embedding_forward(weight, rows)
        else:
            out = impl.multi_field_embedding_bag_forward(weight, rows, starts, per_sample_weights, mean)
        ctx.impl = impl
        ctx.opts = (grad, mean, lr, eps, deterministic)
        ctx.num_rows = weight.shape[0]
        ctx.weight_dtype = weight.dtype
        ctx.applied = False
        psw_grad = per_sample_weights is not None and ctx.needs_input_grad[3]
        if grad in _OPTIMIZERS:
            # The leaf table (and Adagrad state) are updated in place in backward; they are
            # module-owned leaves, so holding them on ctx makes no reference cycle.
            ctx.weight = weight
            ctx.state = state
        ctx.save_for_backward(rows, starts, per_sample_weights, weight if psw_grad else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        grad, mean, lr, eps, deterministic = ctx.opts
        rows, starts, psw, weight_saved = ctx.saved_tensors
        D = grad_out.shape[-1]
        grad_psw = None
        if starts is None:
            flat = rows.reshape(-1)
            g = grad_out.reshape(-1, D)
        else:
            # Each value's gradient is its bag's, scaled by its per-sample weight or 1/|bag|.
            flat = rows
            lengths = starts[1:] - starts[:-1]
            bag_of = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=rows.device), lengths, output_size=rows.numel())
            g = grad_out.index_select(0, bag_of)
            if weight_saved is not None:
                w_rows = weight_saved.index_select(0, rows)
                grad_psw = (g.float() * w_rows.float()).sum(1).to(psw.dtype)
            if psw is not None:
                g = g * psw.to(g.dtype).unsqueeze(1)
            elif mean:
                g = g / lengths.index_select(0, bag_of).to(g.dtype).unsqueeze(1)
        g = g.contiguous()
        impl = ctx.impl
        if grad in ("dense", "sparse") and not ctx.needs_input_grad[0]:
            grad_w = None
        elif grad == "dense":
            grad_w = impl.embedding_dense_grad(flat, g, ctx.num_rows, ctx.weight_dtype, deterministic)
        elif grad == "sparse":
            unique, merged = impl.embedding_merge_rows(flat, g, deterministic, ctx.num_rows)
            grad_w = torch.sparse_coo_tensor(unique.unsqueeze(0), merged.to(ctx.weight_dtype),
                                             (ctx.num_rows, D), is_coalesced=True,
                                             check_invariants=False)
        else:
            if ctx.applied:
                raise RuntimeError(
                    "backward ran twice through one forward of a fused-optimizer "
                    "MultiFieldEmbedding; that would apply the update twice. Run a new forward "
                    "for every backward (no retain_graph reuse).")
            ctx.applied = True
            with torch.no_grad():
                impl.embedding_fused_update(flat, g, ctx.weight, ctx.state, grad, lr, eps,
                                            deterministic)
            grad_w = None
        return grad_w, None, None, grad_psw, None, None, None, None, None, None, None


def multi_field_embedding(
    rows: torch.Tensor,
    weight: torch.Tensor,
    starts: Optional[torch.Tensor] = None,
    per_sample_weights: Optional[torch.Tensor] = None,
    *,
    pooling: str = "sum",
    grad: str = "dense",
    state: Optional[torch.Tensor] = None,
    lr: Optional[float] = None,
    eps: float = 1e-10,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Functional multi-field lookup on already-offset table rows (no id validation).

    Mirrors ``F.embedding`` (``starts=None``) and ``F.embedding_bag`` with
    ``include_last_offset=True`` (https://pytorch.org/docs/stable/generated/torch.nn.functional.embedding_bag.html).

    Args:
        rows: int64 table rows, any shape for one-hot lookups, ``[NV]`` for bags.
        weight: the table ``[R, D]`` (fp32 or bf16).
        starts: ``[NB + 1]`` int64 bag boundaries (bag ``b`` = ``rows[starts[b]:starts[b+1]]``).
        per_sample_weights: ``[NV]`` weights of the bag values (``pooling="sum"`` only); they
            get a gradient when they require one.
        pooling: ``"sum"`` or ``"mean"`` over each bag.
        grad: ``"dense"``, ``"sparse"`` (coalesced COO gradient), or ``"sgd"`` / ``"adagrad"``
            to update the touched rows of ``weight`` in place during backward (``weight.grad``
            stays ``None``).
        state: Adagrad sum of squares ``[R, D]`` (``grad="adagrad"``), updated in place.
        lr: learning rate of the fused step (torch's default for the optimizer when ``None``).
        eps: Adagrad's ``eps``.
        deterministic: merge duplicate rows by sorting instead of atomics on CUDA (CPU is
            always deterministic); also on under ``torch.use_deterministic_algorithms(True)``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`_impl`).

    Shape:
        - Output: ``[*rows.shape, D]`` (one-hot) or ``[NB, D]`` (bags).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(4, 2))
        >>> out = multi_field_embedding(torch.tensor([1, 1, 3]), w, grad="sgd", lr=0.5)
        >>> out.sum().backward()
        >>> w.grad is None, w[:, 0].tolist()
        (True, [1.0, 0.0, 1.0, 0.5])
    """
    if grad not in ("dense", "sparse") + _OPTIMIZERS:
        raise ValueError(f"grad must be 'dense', 'sparse', 'sgd' or 'adagrad', got {grad!r}")
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if grad in _OPTIMIZERS and not weight.is_leaf:
        raise ValueError("a fused optimizer updates weight in place: it must be a leaf tensor")
    if grad == "adagrad" and (state is None or state.shape != weight.shape):
        raise ValueError("grad='adagrad' needs state, a tensor shaped like weight")
    if per_sample_weights is not None and (starts is None or pooling != "sum"):
        raise ValueError("per_sample_weights need bags (starts) and pooling='sum'")
    lr = _DEFAULT_LR[grad] if (lr is None and grad in _OPTIMIZERS) else lr
    return MultiFieldEmbeddingFunction.apply(
        weight, rows, starts, per_sample_weights, state, grad, pooling == "mean",
        0.0 if lr is None else float(lr), float(eps), _deterministic(deterministic), backend)

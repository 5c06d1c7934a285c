"""The multi-field embedding op: the one CPU/Triton dispatch seam (:func:`_impl`), its launchers as
``torch.library`` ops, :class:`MultiFieldEmbeddingFunction` and its functional twin
:func:`multi_field_embedding`.

The modules built on it (:class:`~fastkd.embedding.MultiFieldEmbedding` and the per-field
reference :class:`~fastkd.embedding.MultiFieldEmbeddingRef`) live in
:mod:`fastkd.embedding.modules`; :mod:`fastkd.embedding` re-exports the names here and its
docstring has the design.
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from .._autograd import forced_backend
from ..reference import embedding as embedding_ref
from . import _native
from ._checks import _BACKENDS, _DEFAULT_LR, _OPTIMIZERS, _POOLINGS

__all__ = ["MultiFieldEmbeddingFunction", "multi_field_embedding", "NATIVE_CPU"]

#: True when the native CPU backward (``fastkd._embedding``) is built; without it the CPU path
#: is the plain-PyTorch reference, with the same results.
NATIVE_CPU: bool = _native.NATIVE

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
        from ..kernels import embedding as kernels
    except ImportError:
        return None
    return kernels


_REF_IMPL = types.SimpleNamespace(**{n: getattr(embedding_ref, n + "_ref") for n in _LAUNCHERS})
# The CPU path: the reference, with the sparse and fused backward done natively where it can
# (each native function hands what it does not take back to the reference).
_CPU_IMPL = types.SimpleNamespace(**{
    n: getattr(_native, n, None) or getattr(embedding_ref, n + "_ref") for n in _LAUNCHERS})


def _impl_name(device: torch.device, backend: str, dtype: Optional[torch.dtype] = None) -> str:
    """The name (``"cpu"``, ``"torch"`` or ``"triton"``) of the implementation :func:`_impl` picks."""
    if backend == "auto":
        forced = forced_backend()
        if forced:
            backend = forced
        elif device.type != "cuda":
            return "cpu"
        elif dtype == torch.float64:
            return "torch"
    if backend == "torch":
        return "torch"
    if _load_kernels() is None:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package")
        return "torch"
    return "triton"


def _impl_named(name: str):
    if name == "cpu":
        return _CPU_IMPL
    if name == "torch":
        return _REF_IMPL
    kernels = _load_kernels()
    return types.SimpleNamespace(**{n: getattr(kernels, n) for n in _LAUNCHERS})


def _impl(device: torch.device, backend: str, dtype: Optional[torch.dtype] = None):
    """The single place where the embedding's implementation is chosen.

    ``"auto"``: Triton for CUDA tensors when it imports, the CPU path otherwise (the reference
    plus the native sparse/fused backward; the plain reference for float64 CUDA tables: the
    kernels compute in float32); the environment variable ``FASTKD_BACKEND=torch|triton``
    overrides ``"auto"`` as it does for the losses. ``"triton"`` forces the kernels (on CPU
    tensors only under ``TRITON_INTERPRET=1``, as the tests do); ``"torch"`` forces the pure
    PyTorch reference. All namespaces expose the same launcher names.
    """
    return _impl_named(_impl_name(device, backend, dtype))


def _deterministic(flag: bool) -> bool:
    return bool(flag) or torch.are_deterministic_algorithms_enabled()


# ------------------------------------------------------------------------------------------------
# The launchers as torch.library ops
# ------------------------------------------------------------------------------------------------
# Each launcher is also the op ``fastkd::<launcher>`` with a fake (meta) kernel, so that
# torch.compile traces a model through the embedding, backward and fused update included, without
# a graph break. The op's last argument names the implementation (:func:`_impl_name`), chosen
# once in the forward. Schemas are written out: this module's annotations are strings.
def _fake_forward(weight, rows, impl):
    return weight.new_empty(*rows.shape, weight.shape[1])


def _fake_bag_forward(weight, values, starts, per_sample_weights, mean, impl):
    return weight.new_empty(starts.shape[0] - 1, weight.shape[1])


def _fake_dense_grad(rows, grad_rows, num_rows, dtype, deterministic, impl):
    return grad_rows.new_empty(num_rows, grad_rows.shape[1], dtype=dtype)


def _fake_merge_rows(rows, grad_rows, deterministic, num_rows, impl):
    unique = torch.library.get_ctx().new_dynamic_size()  # U, the number of distinct rows
    return (rows.new_empty(unique, dtype=torch.int64),
            grad_rows.new_empty(unique, grad_rows.shape[1], dtype=torch.float32))


def _fake_fused_update(rows, grad_rows, weight, state, optimizer, lr, eps, deterministic, impl):
    return None  # weight (and state) are updated in place


# launcher -> (op schema, fake kernel)
_OP_SPECS = {
    "multi_field_embedding_forward": ("(Tensor weight, Tensor rows, str impl) -> Tensor", _fake_forward),
    "multi_field_embedding_bag_forward": (
        "(Tensor weight, Tensor values, Tensor starts, Tensor? per_sample_weights, bool mean, str impl)"
        " -> Tensor", _fake_bag_forward),
    "embedding_dense_grad": (
        "(Tensor rows, Tensor grad_rows, SymInt num_rows, ScalarType dtype, bool deterministic, str impl)"
        " -> Tensor", _fake_dense_grad),
    "embedding_merge_rows": (
        "(Tensor rows, Tensor grad_rows, bool deterministic, SymInt num_rows, str impl) -> (Tensor, Tensor)",
        _fake_merge_rows),
    "embedding_fused_update": (
        "(Tensor rows, Tensor grad_rows, Tensor(a!) weight, Tensor(b!)? state, str optimizer, float lr,"
        " float eps, bool deterministic, str impl) -> ()", _fake_fused_update),
}


def _register_op(name: str):
    def run(*args):
        *args, impl = args
        return getattr(_impl_named(impl), name)(*args)

    schema, fake = _OP_SPECS[name]
    mutates = ("weight", "state") if name == "embedding_fused_update" else ()
    op = torch.library.custom_op("fastkd::" + name, run, mutates_args=mutates, schema=schema)
    op.register_fake(fake)
    return op


_OPS = {name: _register_op(name) for name in _LAUNCHERS}


def _run(name: str, impl: str, *args):
    """Launcher ``name`` of implementation ``impl``: through its ``fastkd::`` op while
    torch.compile traces or a dispatch mode is active (fake tensors, export, opcheck), else
    directly, as ``fastkd.kernels._common.run_op`` does (the custom-op dispatch costs host time)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return _OPS[name](*args, impl)
    return getattr(_impl_named(impl), name)(*args)


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
        impl = _impl_name(weight.device, backend, weight.dtype)
        if starts is None:
            out = _run("multi_field_embedding_forward", impl, weight, rows)
        else:
            out = _run("multi_field_embedding_bag_forward", impl, weight, rows, starts,
                       per_sample_weights, mean)
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
            grad_w = _run("embedding_dense_grad", impl, flat, g, ctx.num_rows, ctx.weight_dtype,
                          deterministic)
        elif grad == "sparse":
            unique, merged = _run("embedding_merge_rows", impl, flat, g, deterministic, ctx.num_rows)
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
                _run("embedding_fused_update", impl, flat, g, ctx.weight, ctx.state, grad, lr, eps,
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

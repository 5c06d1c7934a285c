"""Fused multi-field embedding for CTR models.

CTR inputs are ``F`` categorical fields per sample, each with its own vocabulary. The obvious
implementation (one ``nn.Embedding`` per field, looped in Python) launches ``F`` lookups and ``F``
backward scatters per step, which dominates the step time of a small student network on CPU.
:class:`MultiFieldEmbedding` stores every field's rows in *one* table and shifts each field's ids
by a per-field offset, so a whole ``[B, F]`` batch is a single lookup.

Backward gives a dense gradient (the default), a sparse one with duplicate rows merged
(``sparse=True``), or no gradient at all: with ``fused_optimizer="sgd"|"adagrad"`` the touched
rows are updated inside backward, as ``torch.optim.SGD`` / ``Adagrad`` would on a sparse gradient,
and no table-sized gradient ever exists. On CUDA the work runs in the Triton kernels of
:mod:`fastkd.kernels.embedding`; on CPU in their plain-PyTorch twins (:mod:`fastkd.embedding_ref`,
also the test oracle), except the sparse and fused backward, which the native extension
``fastkd._embedding`` does in one pass when it is built (:mod:`fastkd._embedding_native`;
:data:`NATIVE_CPU`). The choice is made in one place, :func:`_impl`.

:class:`MultiFieldEmbeddingRef` is the plain per-field version (one ``nn.Embedding`` or
``nn.EmbeddingBag`` per field), kept as a test oracle and for readability; not meant for training.
"""
from __future__ import annotations

import types
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _embedding_native, embedding_ref
from ._autograd import forced_backend

__all__ = [
    "MultiFieldEmbedding",
    "MultiFieldEmbeddingFunction",
    "MultiFieldEmbeddingRef",
    "multi_field_embedding",
    "NATIVE_CPU",
]

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


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
class MultiFieldEmbedding(nn.Module):
    """All fields' embedding tables fused into one table, looked up in one call.

    Field ``f`` owns rows ``offsets[f] : offsets[f] + field_sizes[f]`` of :attr:`weight`; a
    per-field id ``i`` maps to row ``offsets[f] + i``.

    Args:
        field_sizes: vocabulary size of each field (number of distinct ids, all > 0).
        dim: embedding dimension (any positive int).
        mode: ``"onehot"`` (one id per field and sample; input ``ids [B, F]``) or ``"bag"``
            (a bag of ids per field and sample, pooled; input ``(values, offsets)`` per field).
        pooling: ``"sum"`` or ``"mean"`` over each bag (bag mode).
        sparse: if ``True`` the gradient of :attr:`weight` is a sparse COO tensor holding only
            the rows used in the batch, duplicates merged (coalesced); pair it with
            ``torch.optim.SparseAdam`` / ``Adagrad`` / ``SGD``. Dense gradients are the default:
            for the small vocabularies of Frappe/MovieLens-style data a dense Adam step on the
            table is cheaper than the sparse bookkeeping.
        fused_optimizer: ``"sgd"`` or ``"adagrad"`` to update the touched rows inside backward
            (the same step as ``torch.optim.SGD`` / ``Adagrad`` on the merged gradient). No
            table-sized gradient is ever built and :attr:`weight`'s ``.grad`` stays ``None``, so
            an outer optimizer holding all ``model.parameters()`` leaves the table alone. Adagrad's
            state is the buffer ``state_sum`` (in the ``state_dict``). Excludes ``sparse``.
        lr: learning rate of the fused step (default: torch's, 1e-3 for SGD, 1e-2 for Adagrad).
            May be changed between steps through the attribute.
        eps: Adagrad's ``eps`` (default 1e-10, as torch).
        initial_accumulator_value: Adagrad's initial ``state_sum`` (default 0, as torch).
        deterministic: on CUDA, merge duplicate rows by sorting instead of with atomics (slower
            on skewed ids, bit-identical across runs). Also implied by
            ``torch.use_deterministic_algorithms(True)``. The CPU path is always deterministic.
        backend: ``"auto"`` (Triton on CUDA for sparse / fused gradients, plain PyTorch
            otherwise; dense gradients keep torch's own embedding ops), ``"triton"`` (the
            kernels for every mode) or ``"torch"``.
        init_std: std of the ``N(0, init_std^2)`` initialisation (default ``1e-4``, the usual CTR
            choice: interaction terms start near zero; Adam is scale-free so learning is not
            slowed).

    Shape:
        - One-hot input: ``ids`` int64 (or int32) ``[B, F]``, column ``f`` holding ids in
          ``[0, field_sizes[f])``.
        - Bag input: ``values`` and ``offsets``, lists of ``F`` 1-D int tensors, as
          ``nn.EmbeddingBag`` takes them per field (``offsets[f]`` ``[B]`` holds the start of each
          sample's bag in ``values[f]``); optional ``per_sample_weights``, a list of ``F`` float
          tensors shaped like ``values`` (sum pooling only; differentiable).
        - Output: ``[B, F, dim]`` in the dtype of :attr:`weight` (in bag mode a transposed view
          of the field-major result).

    Range checking: on CPU tensors every call checks the ids and raises ``ValueError`` naming
    the offending field. The check is skipped for non-CPU tensors and while
    ``torch.compile`` traces, because it needs a host read (a device sync / graph break); an
    out-of-range id on CUDA is then undefined behaviour of the gather.

    Example:
        >>> import torch
        >>> emb = MultiFieldEmbedding([3, 5, 2], dim=4)
        >>> ids = torch.tensor([[0, 4, 1], [2, 0, 0]])
        >>> emb(ids).shape
        torch.Size([2, 3, 4])
        >>> emb.offsets.tolist()
        [0, 3, 8]
        >>> fused = MultiFieldEmbedding([3, 5, 2], dim=4, fused_optimizer="adagrad", lr=0.1)
        >>> fused(ids).sum().backward()  # rows updated here; nothing for an optimizer to step
        >>> fused.weight.grad is None
        True
        >>> bags = MultiFieldEmbedding([3, 5], dim=4, mode="bag", pooling="mean")
        >>> values = [torch.tensor([0, 2, 1]), torch.tensor([4, 4])]
        >>> offsets = [torch.tensor([0, 2]), torch.tensor([0, 1])]
        >>> bags(values, offsets).shape
        torch.Size([2, 2, 4])
    """

    def __init__(
        self,
        field_sizes: Sequence[int],
        dim: int,
        *,
        mode: str = "onehot",
        pooling: str = "sum",
        sparse: bool = False,
        fused_optimizer: Optional[str] = None,
        lr: Optional[float] = None,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        deterministic: bool = False,
        backend: str = "auto",
        init_std: float = DEFAULT_INIT_STD,
    ) -> None:
        super().__init__()
        sizes = _check_field_sizes(field_sizes)
        if mode not in _MODES:
            raise ValueError(f"mode must be 'onehot' or 'bag', got {mode!r}")
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
        if fused_optimizer is not None and fused_optimizer not in _OPTIMIZERS:
            raise ValueError(f"fused_optimizer must be None, 'sgd' or 'adagrad', got {fused_optimizer!r}")
        if fused_optimizer is not None and sparse:
            raise ValueError("sparse=True and fused_optimizer exclude each other: a fused "
                             "optimizer updates the table in backward and leaves no gradient")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if lr is not None and not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0 or not initial_accumulator_value >= 0:
            raise ValueError("eps and initial_accumulator_value must be >= 0")
        self._field_sizes = sizes
        self._dim = _check_dim(dim)
        self.mode = mode
        self.pooling = pooling
        self.sparse = bool(sparse)
        self.fused_optimizer = fused_optimizer
        self.lr = float(_DEFAULT_LR[fused_optimizer] if lr is None and fused_optimizer else (lr or 0.0))
        self.eps = float(eps)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.deterministic = bool(deterministic)
        self.backend = backend
        self.init_std = float(init_std)
        self.weight = nn.Parameter(torch.empty(sum(sizes), self._dim))
        if fused_optimizer == "adagrad":
            self.register_buffer("state_sum", torch.empty(sum(sizes), self._dim))
        else:
            self.state_sum = None
        sizes_t = torch.tensor(sizes, dtype=torch.int64)
        # Not persistent: offsets are a pure function of field_sizes, and keeping them out of the
        # state_dict keeps checkpoints to learned tensors only.
        self.register_buffer("_offsets", torch.cumsum(sizes_t, 0) - sizes_t, persistent=False)
        self.register_buffer("_sizes", sizes_t, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw :attr:`weight` from ``N(0, init_std^2)`` (uses the global torch RNG) and reset
        the fused optimizer's state."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            if self.state_sum is not None:
                self.state_sum.fill_(self.initial_accumulator_value)

    @property
    def num_fields(self) -> int:
        """Number of fields ``F``."""
        return len(self._field_sizes)

    @property
    def field_sizes(self) -> Tuple[int, ...]:
        """Vocabulary size of each field."""
        return self._field_sizes

    @property
    def offsets(self) -> torch.Tensor:
        """int64 ``[F]`` first row of each field in :attr:`weight` (exclusive cumsum)."""
        return self._offsets

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    @property
    def num_embeddings(self) -> int:
        """Total number of rows, ``sum(field_sizes)``."""
        return self.weight.shape[0]

    @property
    def grad_mode(self) -> str:
        """What backward produces: ``"dense"``, ``"sparse"``, ``"sgd"`` or ``"adagrad"``."""
        return self.fused_optimizer or ("sparse" if self.sparse else "dense")

    def flat_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Validate per-field ``ids`` ``[B, F]`` and return the int64 row ids ``ids + offsets``.

        Models that look up several tables sharing these fields (e.g. the first-order weights of
        DeepFM) call this once and reuse the result with :meth:`lookup`.
        """
        _validate_ids(ids, self._field_sizes, self._sizes)
        # int64 arithmetic: int32 ids plus offsets could overflow for large total vocabularies.
        return ids.to(torch.int64) + self._offsets

    def _check_fused(self) -> None:
        # A gradient on a fused table means something else differentiated it (e.g. a penalty on
        # self.weight): an outer optimizer would then step it on top of the fused update.
        if self.fused_optimizer is not None and self.weight.grad is not None:
            raise RuntimeError(
                "MultiFieldEmbedding with fused_optimizer updates its weight inside backward, "
                "but weight.grad is set: some other term differentiates the table and an outer "
                "optimizer would update it a second time. Penalise the looked-up rows instead, "
                "or use sparse=True with a torch optimizer.")

    def _plain_torch(self) -> bool:
        # Dense gradients keep autograd's own ops (index_select / F.embedding / embedding_bag)
        # unless Triton is asked for explicitly: on CPU they are the fastest dense formulation,
        # and on CUDA torch's embedding backward stays the default until the Triton dense path
        # has been measured against it on a GPU.
        if self.grad_mode != "dense":
            return False
        if self.weight.dtype in (torch.bfloat16, torch.float16):
            # Low-precision tables: torch's CPU index_add_ / embedding_bag backward add duplicate
            # rows in the table's own dtype, and on an H200 its CUDA embedding backward gave bf16
            # gradients 0.6 apart from the CPU's for a row looked up ~170 times. fastkd's
            # reference and Triton kernels accumulate in fp32 and round once.
            return False
        if self.backend == "auto":
            return forced_backend() != "triton"
        return self.backend == "torch"

    def lookup(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """Rows for already-offset ids from :meth:`flat_ids` (no validation)."""
        if self.mode != "onehot":
            raise RuntimeError("lookup() is the one-hot path; bag mode takes (values, offsets)")
        if self._plain_torch():
            if self.weight.device.type != "cpu":
                return F.embedding(flat_ids, self.weight)
            # Same forward as F.embedding, but autograd's backward for index_select is a single
            # zeros().index_add_(), 3-4x faster on CPU than embedding_dense_backward for a
            # 2048 x 10 batch, with the same result (both accumulate rows in index order).
            return self.weight.index_select(0, flat_ids.reshape(-1)).view(*flat_ids.shape, self._dim)
        self._check_fused()
        return MultiFieldEmbeddingFunction.apply(
            self.weight, flat_ids, None, None, self.state_sum, self.grad_mode, False, self.lr,
            self.eps, _deterministic(self.deterministic), self.backend)

    def forward(self, input: Union[torch.Tensor, Sequence[torch.Tensor]],
                offsets: Optional[Sequence[torch.Tensor]] = None,
                per_sample_weights: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        if self.mode == "onehot":
            if offsets is not None or per_sample_weights is not None:
                raise ValueError("offsets / per_sample_weights are for mode='bag'")
            return self.lookup(self.flat_ids(input))
        return self._forward_bag(input, offsets, per_sample_weights)

    def _forward_bag(self, values, offsets, per_sample_weights) -> torch.Tensor:
        nf = self.num_fields
        values = _as_field_list(values, "values", nf)
        if offsets is None:
            raise ValueError("mode='bag' needs offsets, one [B] tensor of bag starts per field")
        offsets = _as_field_list(offsets, "offsets", nf)
        psw = None
        if per_sample_weights is not None:
            if self.pooling != "sum":
                raise ValueError("per_sample_weights need pooling='sum' (as nn.EmbeddingBag)")
            psw = _as_field_list(per_sample_weights, "per_sample_weights", nf)
        batch = _validate_bags(values, offsets, psw, self._field_sizes)
        # Field-major bags: field f's B bags follow field f-1's, so the global bag starts are each
        # field's offsets shifted by the number of values before it.
        lengths = [v.numel() for v in values]
        base = 0
        starts = []
        for o, n in zip(offsets, lengths):
            starts.append(o.to(torch.int64) + base)
            base += n
        dev = self.weight.device
        starts.append(torch.tensor([base], dtype=torch.int64, device=dev))
        starts = torch.cat(starts)
        rows = torch.cat([v.to(torch.int64) + self._offsets[f] for f, v in enumerate(values)])
        psw_flat = torch.cat(psw).to(self.weight.dtype) if psw is not None else None
        if self._plain_torch():
            out = F.embedding_bag(rows, self.weight, starts, mode=self.pooling,
                                  per_sample_weights=psw_flat, include_last_offset=True)
        else:
            self._check_fused()
            out = MultiFieldEmbeddingFunction.apply(
                self.weight, rows, starts, psw_flat, self.state_sum, self.grad_mode,
                self.pooling == "mean", self.lr, self.eps, _deterministic(self.deterministic),
                self.backend)
        return out.view(nf, batch, self._dim).transpose(0, 1)

    def field_weight(self, field: int) -> torch.Tensor:
        """View of field ``field``'s rows of :attr:`weight`, ``[field_sizes[field], dim]``."""
        if not 0 <= field < self.num_fields:
            raise IndexError(f"field must be in [0, {self.num_fields}), got {field}")
        start = int(self._offsets[field])
        return self.weight[start : start + self._field_sizes[field]]

    def extra_repr(self) -> str:
        s = f"field_sizes={list(self._field_sizes)}, dim={self._dim}"
        if self.mode != "onehot":
            s += f", mode={self.mode!r}, pooling={self.pooling!r}"
        if self.sparse:
            s += ", sparse=True"
        if self.fused_optimizer:
            s += f", fused_optimizer={self.fused_optimizer!r}, lr={self.lr}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class MultiFieldEmbeddingRef(nn.Module):
    """Reference multi-field embedding: one ``nn.Embedding`` (or ``nn.EmbeddingBag``) per field.

    Numerically identical to :class:`MultiFieldEmbedding` once the weights are copied with
    :meth:`from_fused` / :meth:`load_from`; used as the oracle in tests. It is slower (``F``
    lookups and ``F`` backward scatters per step) and not meant for training.

    Args:
        field_sizes: vocabulary size of each field.
        dim: embedding dimension.
        sparse: passed to every ``nn.Embedding`` / ``nn.EmbeddingBag``.
        mode: ``"onehot"`` (``nn.Embedding`` per field) or ``"bag"`` (``nn.EmbeddingBag``).
        pooling: the bags' ``mode`` (``"sum"`` or ``"mean"``).
        init_std: std of the normal initialisation. With the same seed this draws the same
            numbers as :class:`MultiFieldEmbedding` only in distribution, not value by value;
            copy weights for exact equality.

    Shape:
        - Input: ``ids`` ``[B, F]`` integer; in bag mode ``(values, offsets,
          per_sample_weights=None)``, lists of ``F`` 1-D tensors as for
          :class:`MultiFieldEmbedding`.
        - Output: ``[B, F, dim]``.

    Example:
        >>> import torch
        >>> fused = MultiFieldEmbedding([3, 5], dim=2)
        >>> ref = MultiFieldEmbeddingRef.from_fused(fused)
        >>> ids = torch.tensor([[2, 4]])
        >>> torch.equal(ref(ids), fused(ids))
        True
    """

    def __init__(
        self,
        field_sizes: Sequence[int],
        dim: int,
        *,
        sparse: bool = False,
        mode: str = "onehot",
        pooling: str = "sum",
        init_std: float = DEFAULT_INIT_STD,
    ) -> None:
        super().__init__()
        sizes = _check_field_sizes(field_sizes)
        if mode not in _MODES:
            raise ValueError(f"mode must be 'onehot' or 'bag', got {mode!r}")
        self._field_sizes = sizes
        self._dim = _check_dim(dim)
        self.mode = mode
        if mode == "bag":
            self.tables = nn.ModuleList(
                nn.EmbeddingBag(s, self._dim, mode=pooling, sparse=sparse) for s in sizes)
        else:
            self.tables = nn.ModuleList(nn.Embedding(s, self._dim, sparse=sparse) for s in sizes)
        self.register_buffer("_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        with torch.no_grad():
            for t in self.tables:
                t.weight.normal_(0.0, init_std)

    @property
    def num_fields(self) -> int:
        return len(self._field_sizes)

    @property
    def field_sizes(self) -> Tuple[int, ...]:
        return self._field_sizes

    @property
    def dim(self) -> int:
        return self._dim

    @classmethod
    def from_fused(cls, fused: MultiFieldEmbedding) -> "MultiFieldEmbeddingRef":
        """Build a reference embedding holding a copy of ``fused``'s weights."""
        ref = cls(fused.field_sizes, fused.dim, sparse=fused.sparse, mode=fused.mode,
                  pooling=fused.pooling)
        ref.to(device=fused.weight.device, dtype=fused.weight.dtype)
        ref.load_from(fused)
        return ref

    @torch.no_grad()
    def load_from(self, fused: MultiFieldEmbedding) -> "MultiFieldEmbeddingRef":
        """Copy ``fused``'s per-field rows into the per-field tables (in place)."""
        if tuple(fused.field_sizes) != self._field_sizes or fused.dim != self._dim:
            raise ValueError(
                "fused embedding does not match: field_sizes/dim "
                f"{list(fused.field_sizes)}/{fused.dim} vs {list(self._field_sizes)}/{self._dim}"
            )
        for f, table in enumerate(self.tables):
            table.weight.copy_(fused.field_weight(f))
        return self

    def fused_grad(self) -> torch.Tensor:
        """Per-field weight grads stacked into the fused layout ``[sum(field_sizes), dim]``.

        Sparse grads are densified; a field without a grad contributes zeros.
        """
        parts: List[torch.Tensor] = []
        for table in self.tables:
            g = table.weight.grad
            if g is None:
                g = torch.zeros_like(table.weight)
            elif g.is_sparse:
                g = g.to_dense()
            parts.append(g)
        return torch.cat(parts, 0)

    def forward(self, ids, offsets=None, per_sample_weights=None) -> torch.Tensor:
        if self.mode == "bag":
            psw = per_sample_weights or [None] * self.num_fields
            return torch.stack([table(ids[f], offsets[f], per_sample_weights=psw[f])
                                for f, table in enumerate(self.tables)], dim=1)
        _validate_ids(ids, self._field_sizes, self._sizes)
        return torch.stack([table(ids[:, f]) for f, table in enumerate(self.tables)], dim=1)

    def extra_repr(self) -> str:
        return f"field_sizes={list(self._field_sizes)}, dim={self._dim}"

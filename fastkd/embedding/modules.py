"""The ``nn.Module`` forms of the multi-field embedding: :class:`MultiFieldEmbedding` (one fused
table, the op of :mod:`fastkd.embedding.ops`) and :class:`MultiFieldEmbeddingRef` (one table per
field, the test oracle). The design is in :mod:`fastkd.embedding`'s docstring.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._autograd import forced_backend
from ._checks import (_DEFAULT_LR, _MODES, _check_bags, _check_dim, _check_field_sizes, _check_module_options,
                      _validate_ids)
from .ops import MultiFieldEmbeddingFunction, _deterministic

__all__ = ["MultiFieldEmbedding", "MultiFieldEmbeddingRef", "DEFAULT_INIT_STD"]

# CTR embeddings are conventionally initialised close to zero (N(0, 1e-4) is the common default
# in CTR benchmark suites such as FuxiCTR/BARS). Tiny rows make second-order terms (FM, CIN, cross
# layers) start near zero, so every model begins almost as its linear / MLP part and interaction
# terms grow only as the data supports them. Adam's update size does not depend on the parameter
# scale, so the small start does not slow learning (rows reach O(lr) after one step).
DEFAULT_INIT_STD = 1e-4


class _FieldLayout(nn.Module):
    """What both embeddings share: checked ``field_sizes`` (also as the int64 buffer ``_sizes``),
    ``dim`` and ``mode``, and the read-only properties over them."""

    def __init__(self, field_sizes: Sequence[int], dim: int, mode: str) -> None:
        super().__init__()
        sizes = _check_field_sizes(field_sizes)
        if mode not in _MODES:
            raise ValueError(f"mode must be 'onehot' or 'bag', got {mode!r}")
        self._field_sizes = sizes
        self._dim = _check_dim(dim)
        self.mode = mode
        # Not persistent (nor the fused table's offsets): a pure function of field_sizes, and
        # keeping them out of the state_dict keeps checkpoints to learned tensors only.
        self.register_buffer("_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)

    @property
    def num_fields(self) -> int:
        """Number of fields ``F``."""
        return len(self._field_sizes)

    @property
    def field_sizes(self) -> Tuple[int, ...]:
        """Vocabulary size of each field."""
        return self._field_sizes

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    def extra_repr(self) -> str:
        return f"field_sizes={list(self._field_sizes)}, dim={self._dim}"


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
class MultiFieldEmbedding(_FieldLayout):
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
        super().__init__(field_sizes, dim, mode)
        _check_module_options(pooling, sparse, fused_optimizer, lr, eps, initial_accumulator_value, backend)
        self.pooling = pooling
        self.sparse = bool(sparse)
        self.fused_optimizer = fused_optimizer
        self.lr = float(_DEFAULT_LR[fused_optimizer] if lr is None and fused_optimizer else (lr or 0.0))
        self.eps = float(eps)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.deterministic = bool(deterministic)
        self.backend = backend
        self.init_std = float(init_std)
        rows = sum(self._field_sizes)
        self.weight = nn.Parameter(torch.empty(rows, self._dim))
        if fused_optimizer == "adagrad":
            self.register_buffer("state_sum", torch.empty(rows, self._dim))
        else:
            self.state_sum = None
        self.register_buffer("_offsets", torch.cumsum(self._sizes, 0) - self._sizes, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw :attr:`weight` from ``N(0, init_std^2)`` (uses the global torch RNG) and reset
        the fused optimizer's state."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            if self.state_sum is not None:
                self.state_sum.fill_(self.initial_accumulator_value)

    @property
    def offsets(self) -> torch.Tensor:
        """int64 ``[F]`` first row of each field in :attr:`weight` (exclusive cumsum)."""
        return self._offsets

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
        values, offsets, psw, batch = _check_bags(values, offsets, per_sample_weights, self.pooling,
                                                  self._field_sizes)
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
        return out.view(self.num_fields, batch, self._dim).transpose(0, 1)

    def field_weight(self, field: int) -> torch.Tensor:
        """View of field ``field``'s rows of :attr:`weight`, ``[field_sizes[field], dim]``."""
        if not 0 <= field < self.num_fields:
            raise IndexError(f"field must be in [0, {self.num_fields}), got {field}")
        start = int(self._offsets[field])
        return self.weight[start : start + self._field_sizes[field]]

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.mode != "onehot":
            s += f", mode={self.mode!r}, pooling={self.pooling!r}"
        if self.sparse:
            s += ", sparse=True"
        if self.fused_optimizer:
            s += f", fused_optimizer={self.fused_optimizer!r}, lr={self.lr}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class MultiFieldEmbeddingRef(_FieldLayout):
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
        super().__init__(field_sizes, dim, mode)
        if mode == "bag":
            self.tables = nn.ModuleList(
                nn.EmbeddingBag(s, self._dim, mode=pooling, sparse=sparse) for s in self._field_sizes)
        else:
            self.tables = nn.ModuleList(nn.Embedding(s, self._dim, sparse=sparse) for s in self._field_sizes)
        with torch.no_grad():
            for t in self.tables:
                t.weight.normal_(0.0, init_std)

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

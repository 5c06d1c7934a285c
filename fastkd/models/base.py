"""Shared pieces of the CTR models: the :class:`CTRModel` base class, the MLP block and the
first-order (linear) term."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..embedding import DEFAULT_INIT_STD, MultiFieldEmbedding

__all__ = ["CTRModel", "MLP", "FirstOrder", "FastDropout", "ReLUDropout", "HEAD_INITS"]

# the output layer's initialisation (CTRModel(head_init=...))
HEAD_INITS = ("torch", "xavier")

ForwardOut = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _check_hidden_units(hidden_units: Sequence[int], name: str = "hidden_units") -> Tuple[int, ...]:
    if isinstance(hidden_units, int):
        raise TypeError(f"{name} must be a sequence of ints (e.g. (400, 400)), got {hidden_units}")
    units = tuple(hidden_units)
    for i, u in enumerate(units):
        if int(u) != u or u <= 0:
            raise ValueError(f"{name}[{i}] must be a positive int, got {u!r}")
    return tuple(int(u) for u in units)


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def _dropout_params(p: float) -> Tuple[int, float]:
    """``(threshold, scale)``: drop when a uniform int16 draw is below ``threshold - 32768``."""
    threshold = min(round(p * 65536), 65535)
    return threshold, 65536.0 / (65536 - threshold)


def _keep_mask(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Float tensor shaped like ``x``: ``scale`` where kept, 0 where dropped (CPU only)."""
    n = x.numel()
    # random_(-2**63, None) fills int64 words with 64 uniform bits; viewed as int16 each word
    # gives four mask entries, uniform on [-32768, 32767].
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    bits = words.view(torch.int16)[:n]
    # Compare straight into a float buffer (skips a bool tensor and a cast), then scale.
    mask = torch.ge(bits, threshold - 32768, out=torch.empty(n, dtype=x.dtype))
    return mask.mul_(scale).view(x.shape)


class _ReLUDropoutFn(torch.autograd.Function):
    """``dropout(relu(x))`` in place on the mask buffer; backward needs only the output.

    Kept entries are ``scale * relu(x)``, so ``out > 0`` exactly where the gradient passes and
    the backward is ``threshold_backward(grad, out) * scale``: no mask is stored, and ``out`` is
    the tensor the next Linear saves anyway.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        out = _keep_mask(x, threshold, 1.0)
        out.mul_(x).clamp_min_(0).mul_(scale)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None, None


class FastDropout(nn.Module):
    """Inverted dropout with a cheaper CPU mask than ``nn.Dropout``.

    ``nn.Dropout`` on CPU draws one Mersenne-Twister number per element through
    ``bernoulli_``, which for the student's three ``2048 x 400`` activations cost more than all
    of its matrix multiplies. Here the mask comes from 16-bit slices of ``int64``
    random words (four elements per draw) compared with a threshold, several times cheaper;
    it still uses the global torch RNG, so ``torch.manual_seed`` makes it deterministic. On
    non-CPU devices it defers to ``F.dropout``.

    The drop probability is quantised to a multiple of ``1/65536`` (``p = 0.1`` becomes
    ``6554/65536 = 0.100006``); kept activations are scaled by ``1 / (1 - p_effective)`` so the
    expectation is exact. Identity in eval mode or when ``p == 0``.

    Args:
        p: drop probability in ``[0, 1)``.

    Shape:
        - Input / output: any shape.

    Example:
        >>> import torch
        >>> drop = FastDropout(0.5).eval()
        >>> torch.equal(drop(torch.ones(3)), torch.ones(3))
        True
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = _check_dropout(p)
        self._threshold, self._scale = _dropout_params(self.p)

    @property
    def effective_p(self) -> float:
        """The drop probability actually used, ``round(p * 65536) / 65536``."""
        return self._threshold / 65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._threshold == 0:
            return x
        if x.device.type != "cpu":
            # GPU dropout is already a fused Philox kernel; the trick here only pays on CPU.
            return F.dropout(x, self.effective_p, True)
        return x * _keep_mask(x, self._threshold, self._scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLUDropout(FastDropout):
    """``FastDropout(relu(x))`` as one autograd op (the ReLU + Dropout of an MLP block).

    Same values and gradients as ``nn.ReLU`` followed by :class:`FastDropout` with the same RNG
    state, but with fewer passes over the activation and no stored mask (about 5% of a DNN
    student train step on CPU). Plain ReLU in eval mode or when ``p == 0``.

    Args:
        p: drop probability in ``[0, 1)`` (quantised as in :class:`FastDropout`).

    Shape:
        - Input / output: any shape.

    Example:
        >>> import torch
        >>> act = ReLUDropout(0.1).eval()
        >>> act(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._threshold == 0:
            return F.relu(x)
        if x.device.type != "cpu":
            return F.dropout(F.relu(x), self.effective_p, True)
        return _ReLUDropoutFn.apply(x, self._threshold, self._scale)


class MLP(nn.Sequential):
    """Stack of ``Linear -> BatchNorm1d -> ReLU -> Dropout`` blocks.

    ReLU and Dropout are one :class:`ReLUDropout` module (plain in-place ReLU when
    ``dropout == 0``).

    With ``batch_norm=True`` the Linear layers have no bias: BatchNorm subtracts the batch mean
    right after, so a bias would be a dead parameter (its gradient is zero up to rounding) and
    would only cost time.

    An empty ``hidden_units`` gives the identity (``output_dim == in_dim``), which lets models
    switch their deep part off.

    Args:
        in_dim: input width.
        hidden_units: width of each hidden layer.
        dropout: dropout probability after each block (0 disables the Dropout module).
        batch_norm: insert ``BatchNorm1d`` after each Linear.

    Shape:
        - Input: ``[B, in_dim]``.
        - Output: ``[B, output_dim]`` with ``output_dim = hidden_units[-1]`` (or ``in_dim``).

    Example:
        >>> import torch
        >>> mlp = MLP(8, (16, 4), dropout=0.1)
        >>> mlp(torch.randn(5, 8)).shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        units = _check_hidden_units(hidden_units)
        dropout = _check_dropout(dropout)
        layers = []
        prev = int(in_dim)
        for u in units:
            layers.append(nn.Linear(prev, u, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(u))
            if dropout > 0:
                layers.append(ReLUDropout(dropout))
            else:
                # In place is safe: neither BatchNorm's nor Linear's backward needs its own output.
                layers.append(nn.ReLU(inplace=True))
            prev = u
        super().__init__(*layers)
        self.in_dim = int(in_dim)
        self.output_dim = prev
        # Xavier-normal weights and zero biases (FuxiCTR's initialisation): on Frappe it gave the
        # plain DNN +0.0015 to +0.005 test AUC over torch's default kaiming-uniform (one seed each,
        # dropout 0.1 and 0.2), enough to matter for a fair baseline.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def __getitem__(self, idx):
        # nn.Sequential slices by re-calling the constructor, whose signature MLP changes.
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)


class FirstOrder(nn.Module):
    """First-order (linear / "wide") term: one scalar weight per feature value, summed over fields.

    It shares the fused row layout (and so the offset ids) of the model's
    :class:`~fastkd.embedding.MultiFieldEmbedding`, so the ids are validated and offset once per
    forward. No bias: every model's output layer already has one.

    Args:
        embedding: the model's main embedding, whose layout this term reuses.

    Shape:
        - Input: flat ids ``[B, F]`` from ``embedding.flat_ids``.
        - Output: ``[B]``.
    """

    def __init__(self, embedding: MultiFieldEmbedding) -> None:
        super().__init__()
        self.sparse = embedding.sparse
        # Zero start: the model begins as its deep part alone, and the term still gets a
        # gradient (d logit / d w = 1 for every looked-up row).
        self.weight = nn.Parameter(torch.zeros(embedding.num_embeddings, 1))

    def forward(self, flat_ids: torch.Tensor) -> torch.Tensor:
        if self.sparse or self.weight.device.type != "cpu":
            return F.embedding(flat_ids, self.weight, sparse=self.sparse).sum(dim=(1, 2))
        # index_select: cheaper CPU backward than F.embedding (see MultiFieldEmbedding.lookup)
        return self.weight.index_select(0, flat_ids.reshape(-1)).view(flat_ids.shape).sum(dim=1)


class CTRModel(nn.Module):
    """Base class of the CTR models: fused embedding in, one logit per sample out.

    Subclasses build their layers in ``__init__`` (after calling this constructor), set
    :attr:`hidden_dim`, and implement :meth:`_forward`.

    Args:
        field_sizes: vocabulary size of each of the ``F`` fields.
        embed_dim: embedding dimension ``D`` shared by all fields.
        hidden_units: widths of the DNN part (``()`` switches the DNN off where the model allows).
        dropout: dropout after each DNN block.
        batch_norm: BatchNorm1d after each DNN Linear.
        embed_reg: coefficient of :meth:`regularization_loss` (0 disables it).
        sparse: sparse gradients for the embedding table and the first-order weights (pair
            those parameters with ``torch.optim.SparseAdam``; plain Adam rejects sparse grads).
        init_std: std of the normal embedding initialisation.
        head_init: "torch" (default: ``nn.Linear``'s own) or "xavier" (Xavier-normal weights, zero
            bias) for the output layer.
        embedding_options: further keyword arguments of :class:`~fastkd.MultiFieldEmbedding`,
            e.g. ``{"fused_optimizer": "adagrad", "lr": 0.01}`` to update the table inside
            backward (its ``.grad`` then stays ``None``, so the model's Adam skips it).

    Shape:
        - Input: ``ids`` int64 ``[B, F]``, per-field ids.
        - Output: logits float ``[B]`` (pre-sigmoid); with ``return_hidden=True`` also
          ``hidden`` ``[B, hidden_dim]``, the last representation before the output layer.

    Batch norm needs ``B > 1`` in training mode (a PyTorch restriction); ``B = 1`` works in eval.

    Example:
        >>> import torch
        >>> from fastkd.models import DNN
        >>> model = DNN([4, 3], embed_dim=2, hidden_units=(8,), embed_reg=1e-3)
        >>> ids = torch.tensor([[0, 2], [3, 1], [1, 0]])
        >>> logits, hidden = model(ids, return_hidden=True)
        >>> logits.shape, hidden.shape, model.hidden_dim
        (torch.Size([3]), torch.Size([3, 8]), 8)
        >>> loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones(3))
        >>> (loss + model.regularization_loss()).backward()
    """

    def __init__(
        self,
        field_sizes: Sequence[int],
        embed_dim: int = 16,
        hidden_units: Sequence[int] = (400, 400, 400),
        dropout: float = 0.1,
        batch_norm: bool = True,
        *,
        embed_reg: float = 0.0,
        sparse: bool = False,
        init_std: float = DEFAULT_INIT_STD,
        embedding_options: Optional[dict] = None,
        head_init: str = "torch",
    ) -> None:
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.head_init = head_init
        if embed_reg < 0:
            raise ValueError(f"embed_reg must be >= 0, got {embed_reg}")
        # sparse= and init_std= may also come in embedding_options (where the other
        # MultiFieldEmbedding settings live); only a contradiction between the two is an error
        opts = dict(embedding_options or {})
        for key, value, default in (("sparse", sparse, False), ("init_std", init_std, DEFAULT_INIT_STD)):
            if key in opts and value != default and opts[key] != value:
                raise ValueError(f"{key}={value!r} contradicts embedding_options[{key!r}]={opts[key]!r}")
            opts.setdefault(key, value)
        self.embedding = MultiFieldEmbedding(field_sizes, embed_dim, **opts)
        self.hidden_units = _check_hidden_units(hidden_units)
        self.dropout = _check_dropout(dropout)
        self.batch_norm = bool(batch_norm)
        self.embed_reg = float(embed_reg)
        self.hidden_dim: int = 0  # set by subclasses
        self._last_emb: Optional[torch.Tensor] = None

    def _head(self, in_dim: int) -> nn.Linear:
        """The output layer ``in_dim -> 1``: torch's default initialisation, or with
        ``head_init="xavier"`` Xavier-normal weights and a zero bias, as the MLP's layers (and
        FuxiCTR's every Linear) start."""
        head = nn.Linear(in_dim, 1)
        if self.head_init == "xavier":
            nn.init.xavier_normal_(head.weight)
            nn.init.zeros_(head.bias)
        return head

    @property
    def field_sizes(self) -> Tuple[int, ...]:
        return self.embedding.field_sizes

    @property
    def num_fields(self) -> int:
        return self.embedding.num_fields

    @property
    def embed_dim(self) -> int:
        return self.embedding.dim

    @property
    def flat_embed_dim(self) -> int:
        """``F * D``, the width of the concatenated field embeddings."""
        return self.embedding.num_fields * self.embedding.dim

    def _mlp(self, in_dim: int) -> MLP:
        return MLP(in_dim, self.hidden_units, self.dropout, self.batch_norm)

    def _forward(self, flat_ids: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Model body: ``flat_ids`` ``[B, F]`` (offset ids), ``emb`` ``[B, F, D]`` ->
        ``(logits [B], hidden [B, hidden_dim])``."""
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, return_hidden: bool = False) -> ForwardOut:
        """Logits ``[B]`` for per-field ``ids`` ``[B, F]``; ``(logits, hidden)`` with
        ``return_hidden=True``. Ids are range-checked on CPU (``ValueError`` naming the field)."""
        flat_ids = self.embedding.flat_ids(ids)
        emb = self.embedding.lookup(flat_ids)
        # Kept (only when regularising) so regularization_loss() can reuse this batch's rows
        # without a second lookup or a forward hook.
        self._last_emb = emb if self.embed_reg > 0 else None
        logits, hidden = self._forward(flat_ids, emb)
        return (logits, hidden) if return_hidden else logits

    def regularization_loss(self) -> torch.Tensor:
        """``embed_reg * mean_b sum_{f,d} e[b, f, d]^2`` over the last forward's embeddings.

        The L2 penalty is on the rows looked up in the last batch (rows seen more often are
        penalised more, like per-step weight decay on the active rows only), which is the
        usual CTR embedding regulariser and keeps the cost O(B*F*D) instead of O(table).
        Returns a zero scalar when ``embed_reg == 0`` or before any forward. Only the latest
        forward counts: call it after the forward whose batch should be regularised.
        """
        emb = self._last_emb
        if self.embed_reg == 0 or emb is None:
            return self.embedding.weight.new_zeros(())
        return self.embed_reg * emb.pow(2).sum() / emb.shape[0]

    def __getstate__(self):
        # The cached batch embeddings are a non-leaf tensor, which deepcopy/pickle reject; they
        # are per-step scratch, not model state.
        state = super().__getstate__()
        state["_last_emb"] = None
        return state

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, embed_reg={self.embed_reg}"

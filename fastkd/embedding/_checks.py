"""Argument checks of the multi-field embedding: option names, field sizes, one-hot ids and bags.

Shared by the op (:mod:`fastkd.embedding.ops`) and the modules (:mod:`fastkd.embedding.modules`).
Range checks read the ids on the host, so they run on CPU tensors only and never while
``torch.compile`` traces (a device sync / graph break).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch

_MODES = ("onehot", "bag")
_POOLINGS = ("sum", "mean")
_OPTIMIZERS = ("sgd", "adagrad")
_BACKENDS = ("auto", "triton", "torch")
# torch.optim's defaults, so `fused_optimizer="adagrad"` alone behaves like `Adagrad(params)`.
_DEFAULT_LR = {"sgd": 1e-3, "adagrad": 1e-2}


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


def _check_module_options(pooling: str, sparse: bool, fused_optimizer: Optional[str], lr: Optional[float],
                          eps: float, initial_accumulator_value: float, backend: str) -> None:
    """The constructor options of :class:`~fastkd.embedding.MultiFieldEmbedding` past its layout."""
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


def _check_bags(values, offsets, per_sample_weights, pooling: str, field_sizes: Sequence[int]):
    """Bag-mode inputs of the module checked: ``(values, offsets, per_sample_weights, B)`` with
    the first three as lists of ``F`` tensors (``per_sample_weights`` may be ``None``)."""
    nf = len(field_sizes)
    values = _as_field_list(values, "values", nf)
    if offsets is None:
        raise ValueError("mode='bag' needs offsets, one [B] tensor of bag starts per field")
    offsets = _as_field_list(offsets, "offsets", nf)
    psw = None
    if per_sample_weights is not None:
        if pooling != "sum":
            raise ValueError("per_sample_weights need pooling='sum' (as nn.EmbeddingBag)")
        psw = _as_field_list(per_sample_weights, "per_sample_weights", nf)
    return values, offsets, psw, _validate_bags(values, offsets, psw, field_sizes)

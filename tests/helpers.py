"""Shared test helpers, importable from tests and benchmarks. Nothing here touches CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The condition string is evaluated by pytest at collection; torch.cuda.is_available() never
# initialises a CUDA context, so a CPU-only machine just skips.
CUDA_REASON = "needs a CUDA device"
requires_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason=CUDA_REASON)


def mark_cuda_items(items) -> None:
    """Give every test skipped by :data:`requires_cuda` the ``cuda`` marker too (conftest hook),
    so ``pytest -m cuda`` (the GPU check) selects all CUDA tests, marked by hand or not."""
    for item in items:
        if any(m.name == "skipif" and m.kwargs.get("reason") == CUDA_REASON for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)


# tiny models and settings for training tests (seconds on a CPU)
SMALL_MODEL = dict(embed_dim=4, hidden_units=(16,), dropout=0.0)


def small_model(name, field_sizes, seed=0):
    """A tiny ``name`` model, seeded so tests build the same weights."""
    import torch
    from fastkd.models import build_model

    torch.manual_seed(seed)
    return build_model(name, field_sizes, **SMALL_MODEL)


def quick_config(max_epochs=2, **kw):
    """A :class:`~fastkd.TrainConfig` for tests: batch 256, no progress bars."""
    from fastkd import TrainConfig

    return TrainConfig(**{"max_epochs": max_epochs, "batch_size": 256, "progress": False, **kw})

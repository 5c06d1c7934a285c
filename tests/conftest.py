"""Shared test helpers. Nothing here touches CUDA at import or collection time."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def cuda_available() -> bool:
    # Called lazily inside skipif conditions' callers only: see requires_cuda below.
    return torch.cuda.is_available()


# A marker whose condition is evaluated at collection by pytest but only calls
# torch.cuda.is_available(), which never initialises a CUDA context on a CPU-only build.
requires_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

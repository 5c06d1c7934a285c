"""Shared test helpers, importable from tests and benchmarks. Nothing here touches CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The condition string is evaluated by pytest at collection; torch.cuda.is_available() never
# initialises a CUDA context, so a CPU-only machine just skips.
requires_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")

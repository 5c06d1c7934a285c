"""Shared test helpers, importable from tests and benchmarks. Nothing here touches CUDA."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The condition string is evaluated by pytest at collection; torch.cuda.is_available() never
# initialises a CUDA context, so a CPU-only machine just skips.
CUDA_REASON = "needs a CUDA device"
requires_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason=CUDA_REASON)

# is_available() asks the driver without creating a context, so collection stays CUDA-free.
ON_GPU = torch.cuda.is_available()
# Where the Triton kernel tests (marked ``loss_kernels``) put their tensors: CUDA where there is a
# GPU, else CPU tensors run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
DEVICE = "cuda" if ON_GPU else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Rows per program in the loss-kernel tests (tests/conftest.py): B = 37 spans 5 programs, B = 1 one.
TEST_BLOCK_B = 8


def register_markers(config) -> None:
    """Register the markers defined here (pytest_configure of tests/ and bench/ conftests), since
    :data:`BACKENDS` is imported by modules of both."""
    config.addinivalue_line(
        "markers",
        "loss_kernels: runs the fused Triton loss kernels (FASTKD_BACKEND=triton, at most "
        f"{TEST_BLOCK_B} rows per program; interpreted on CPU tensors without a GPU, skipped without Triton)",
    )


# The two sides of the loss ops' dispatch seam, for tests that run one body on both: "torch" takes
# the default seam on CPU tensors (the closed-form torch path), "triton" carries the loss_kernels
# mark (tests/conftest.py forces the Triton kernel) and runs on DEVICE.
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.loss_kernels)]


def backend_device(backend: str) -> str:
    """Where a test parametrised over :data:`BACKENDS` puts its tensors."""
    return DEVICE if backend == "triton" else "cpu"


def mark_cuda_items(items) -> None:
    """Give every test skipped by :data:`requires_cuda` the ``cuda`` marker too (conftest hook),
    so ``pytest -m cuda`` (the GPU check) selects all CUDA tests, marked by hand or not."""
    for item in items:
        if any(m.name == "skipif" and m.kwargs.get("reason") == CUDA_REASON for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)


def to_device(device, *tensors):
    """Detached copies of ``tensors`` on ``device`` (``None`` stays ``None``)."""
    return [None if t is None else t.detach().to(device) for t in tensors]


# --------------------------------------------------------------------------------------------
# Inputs of the distillation losses (tests of each loss and the loss benchmarks)
# --------------------------------------------------------------------------------------------
# (name, B, M, C): C = 1 is binary. Always an odd B, a single row, and a larger batch.
SHAPE_PARAMS = [
    ("single_row", 1, 2, 1),
    ("odd", 37, 3, 1),
    ("one_teacher", 16, 1, 1),
    ("five_teachers", 1025, 5, 1),
    ("classes_odd", 13, 2, 5),
    ("classes_single_row", 1, 3, 3),
]
SHAPE_IDS = [p[0] for p in SHAPE_PARAMS]
GATES = ["logit", "hidden", "mean", "fixed"]
ENSEMBLES = ["logit", "prob"]
REDUCTIONS = ["mean", "sum", "none"]
HIDDEN = 6


def make_inputs(B, M, C, dtype=torch.float32, scale=2.0, seed=0):
    """Student logits, ``M`` teachers' logits, labels and teacher hidden vectors (width HIDDEN):
    binary ([B], [B, M], float 0/1 labels) for ``C = 1``, else ``C`` classes (int labels)."""
    g = torch.Generator().manual_seed(seed)
    if C == 1:
        zs = torch.randn(B, generator=g) * scale
        zt = torch.randn(B, M, generator=g) * scale
        y = torch.randint(0, 2, (B,), generator=g).float()
    else:
        zs = torch.randn(B, C, generator=g) * scale
        zt = torch.randn(B, M, C, generator=g) * scale
        y = torch.randint(0, C, (B,), generator=g)
    h = torch.randn(B, M, HIDDEN, generator=g)
    return zs.to(dtype), zt.to(dtype), y, h.to(dtype)


def gate_params(gate, M, C, seed=1, dtype=torch.float32):
    """Random non-zero gate parameters (zero init would hide gradient bugs)."""
    g = torch.Generator().manual_seed(seed)
    if gate == "logit":
        w = torch.randn((M,) if C == 1 else (M, C), generator=g, dtype=dtype)
    elif gate == "hidden":
        w = torch.randn(M, HIDDEN, generator=g, dtype=dtype)
    else:
        return None, None
    return w.requires_grad_(), torch.randn(M, generator=g, dtype=dtype).requires_grad_()


def gate_arg(gate, M):
    """The ``gate`` argument for a gate name: "fixed" becomes fixed weights 1..M, normalised."""
    if gate == "fixed":
        w = torch.arange(1, M + 1, dtype=torch.float32)
        return w / w.sum()
    return gate


def with_value(t, index, value):
    """A copy of ``t`` with ``t[index] = value`` (e.g. a non-finite logit)."""
    t = t.clone()
    t[index] = value
    return t


def softplus(x: float) -> float:
    """log(1 + e^x) of a Python float, for hand-computed loss values."""
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# tiny models and settings for training tests (seconds on a CPU)
# --------------------------------------------------------------------------------------------
SMALL_MODEL = dict(embed_dim=4, hidden_units=(16,), dropout=0.0)


def small_model(name, field_sizes, seed=0):
    """A tiny ``name`` model, seeded so tests build the same weights."""
    from fastkd.models import build_model

    torch.manual_seed(seed)
    return build_model(name, field_sizes, **SMALL_MODEL)


def quick_config(max_epochs=2, **kw):
    """A :class:`~fastkd.TrainConfig` for tests: batch 256, no progress bars."""
    from fastkd import TrainConfig

    return TrainConfig(**{"max_epochs": max_epochs, "batch_size": 256, "progress": False, **kw})

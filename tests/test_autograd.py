"""The loss ops' dispatch seam (``fastkd/_autograd.py``: ``_fwd_impl`` picks the Triton kernel or
the torch twin for each op), the ``torch.library`` registration of both ops, and that importing
fastkd never initialises CUDA. Tests of one op alone are in that op's file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import DEVICE, HAS_TRITON, ON_GPU, REPO, gate_params, make_inputs, to_device
from fastkd._autograd import _fwd_impl
from fastkd.functional import distill_loss

if HAS_TRITON:  # the loss_kernels tests skip without Triton (tests/conftest.py)
    from fastkd.kernels import distill_loss as distill_kernels
    from fastkd.kernels import gated_distill_loss as gated_kernels


# --------------------------------------------------------------------------------------------
# The seam
# --------------------------------------------------------------------------------------------
@pytest.mark.loss_kernels
def test_seam_picks_triton_only_where_it_can_run(monkeypatch):
    from fastkd import reference

    cpu, dev = torch.device("cpu"), torch.device(DEVICE)
    assert _fwd_impl("distill_loss", dev) is distill_kernels.distill_loss_forward
    assert _fwd_impl("gated_distill_loss_reduced", dev) is gated_kernels.gated_distill_loss_forward_reduced
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert _fwd_impl("gated_distill_loss", cpu) is reference.gated_distill_loss_fwd_ref
    monkeypatch.delenv("FASTKD_BACKEND")
    assert _fwd_impl("distill_loss", cpu) is reference.distill_loss_fwd_ref  # CPU tensors: reference
    assert _fwd_impl("distill_loss", torch.device("cuda"), torch.float64) is reference.distill_loss_fwd_ref
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTKD_BACKEND"):
        _fwd_impl("distill_loss", cpu)
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    with pytest.raises(TypeError, match="float64"):
        # on a GPU machine (no interpreter) CPU tensors are refused first, for their device
        _fwd_impl("distill_loss", dev, torch.float64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        distill_loss(torch.randn(4), torch.randn(4), torch.ones(4))


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@pytest.mark.loss_kernels
def test_opcheck_registered_ops():
    zs, zt, y, h = make_inputs(9, 2, 1)
    w, b = gate_params("hidden", 2, 1)
    zs, zt, y, h, w, b = to_device(DEVICE, zs, zt, y, h, w, b)
    torch.library.opcheck(torch.ops.fastkd.distill_loss_fwd.default, (zs, zt[:, 0], y, 2.0, 0.5, 1.0))
    torch.library.opcheck(
        torch.ops.fastkd.gated_distill_loss_fwd.default,
        (zs, zt, y, h, "hidden", w, b, None, 2.0, 0.5, 1.0, "prob", 0.7, 0.25, True),
    )


# --------------------------------------------------------------------------------------------
# No CUDA at import
# --------------------------------------------------------------------------------------------
_IMPORT_SCRIPT = """
import importlib.util, json
import torch
import fastkd
from fastkd import DistillLoss, GatedDistillLoss, HintLoss, MultiFieldEmbedding
import fastkd.embedding, fastkd.functional, fastkd.losses, fastkd.reference
kernels = []
if importlib.util.find_spec("triton") is not None:  # the op modules register their torch.library ops
    import fastkd.kernels.distill_loss, fastkd.kernels.gated_distill_loss, fastkd.kernels.embedding
    kernels = ["distill_loss", "gated_distill_loss", "embedding"]
initialized = torch.cuda.is_initialized()
available = torch.cuda.is_available()  # asks the driver, creates no context
probe = None
if available:  # the probe itself sees a context once one exists
    torch.zeros(1, device="cuda")
    probe = torch.cuda.is_initialized()
print(json.dumps(dict(initialized=initialized, available=available, probe=probe, kernels=kernels)))
"""


def test_import_does_not_initialise_cuda():
    # A fresh interpreter: in this process an earlier test may well have created a CUDA context.
    # Only meaningful where a GPU exists (elsewhere CUDA cannot be initialised at all); there the
    # script also checks that creating a context is visible to the probe.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTKD_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["initialized"] is False, got
    assert got["available"] == ON_GPU
    if ON_GPU:
        assert got["probe"] is True, got
    assert bool(got["kernels"]) == HAS_TRITON

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. Triton reads
# TRITON_INTERPRET when it is first imported, so the flag is set here, before any test module
# (and the kernels it imports) is loaded. is_available() creates no CUDA context.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    from helpers import register_markers

    register_markers(config)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _loss_kernels(request, monkeypatch):
    """For tests marked ``loss_kernels``: force the Triton side of the seam and cap the rows per
    program, so that even small batches span several programs and exercise the deterministic
    partial-sum reduction. Unmarked tests keep the default seam (CPU tensors: the torch path)."""
    if request.node.get_closest_marker("loss_kernels") is None:
        return
    pytest.importorskip("triton")
    from fastkd.kernels import _common
    from helpers import TEST_BLOCK_B

    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    monkeypatch.setattr(_common, "MAX_BLOCK_B", TEST_BLOCK_B)


def pytest_collection_modifyitems(config, items):
    from helpers import mark_cuda_items

    mark_cuda_items(items)
    for item in items:
        if item.get_closest_marker("loss_kernels") is not None:
            # The interpreter evaluates masked lanes too (e.g. −inf − (−inf) in rows past B);
            # numpy warns about them, the stores drop them.
            item.add_marker(pytest.mark.filterwarnings("ignore::RuntimeWarning"))

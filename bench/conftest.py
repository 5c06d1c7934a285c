import sys
from pathlib import Path

import pytest

# the shared test helpers (input factories) live in tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pytest_configure(config):
    from helpers import register_markers

    register_markers(config)


def pytest_collection_modifyitems(config, items):
    from helpers import mark_cuda_items

    mark_cuda_items(items)


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write), the memory-bound reference of
    the CUDA loss benchmarks (measured once per session)."""
    import torch

    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 10
    start.record()
    for _ in range(n):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / n
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 28) * 4 / seconds

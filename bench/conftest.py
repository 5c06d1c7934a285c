import sys
from pathlib import Path

# the shared test helpers (input factories) live in tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pytest_collection_modifyitems(config, items):
    from helpers import mark_cuda_items

    mark_cuda_items(items)

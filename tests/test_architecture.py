"""The codebase's map stays true: every module is in docs/architecture.md, every public name imports.

Mutations that fail these tests: add a module under fastkd/ or kernels/ without a line in the
map; delete or misspell a name's module in ``fastkd._LAZY``; drop a name from ``fastkd.__all__``'s
targets (e.g. rename ``Distiller``).
"""
import importlib
import re

import pytest

from helpers import REPO

MAP = (REPO / "docs" / "architecture.md").read_text()


def _modules():
    for root in ("fastkd", "kernels"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if path.name == "__init__.py":
                rel = rel[: -len("__init__.py")]  # a package is listed by its folder, "fastkd/train/"
                if rel == "fastkd/":
                    continue
            yield rel


MODULES = list(_modules())


def test_the_map_lists_modules():
    assert len(MODULES) > 40  # the walk found the tree


@pytest.mark.parametrize("module", MODULES)
def test_every_module_is_on_the_map(module):
    assert f"`{module}`" in MAP, f"{module} has no line in docs/architecture.md"


def test_the_map_names_no_missing_module():
    # every `fastkd/...py` or `kernels/...py` path the map names exists
    named = set(re.findall(r"`((?:fastkd|kernels)/[\w/]+\.py)`", MAP))
    assert named, "the map names no module"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_public_name_imports():
    import fastkd

    assert len(fastkd.__all__) >= 10
    for name in fastkd.__all__:  # `from fastkd import *` and each documented name work
        assert getattr(fastkd, name) is not None, name
    assert set(fastkd._LAZY) <= set(fastkd.__all__)
    # the lazily imported names resolve to the classes their modules define
    for name, (module, attr) in fastkd._LAZY.items():
        assert getattr(fastkd, name) is getattr(importlib.import_module(module), attr)
    from fastkd.functional import distill_loss, gate_weights, gated_distill_loss, hint_loss  # noqa: F401
    from fastkd.train import Distiller, TeacherCache, TrainConfig, train_model  # noqa: F401

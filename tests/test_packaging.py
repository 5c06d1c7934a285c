"""Packaging: the Triton code installs as fastkd.kernels, never as a top-level `kernels`."""
import shutil
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_install_puts_kernels_under_fastkd(tmp_path):
    target = tmp_path / "site"
    had_build = (REPO / "build").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if not had_build:  # setuptools builds in the source tree; leave it as it was
        shutil.rmtree(REPO / "build", ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (target / "fastkd" / "kernels" / "__init__.py").exists()
    assert (target / "fastkd" / "functional.py").exists()
    assert not (target / "kernels").exists()

"""Build script for fastkd.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed
as ``fastkd.kernels``: a top-level module named ``kernels`` would collide with the PyPI
distribution of that name.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "fastkd", "version.py"), encoding="utf-8") as fh:
        return re.search(r'__version__ = "([^"]+)"', fh.read()).group(1)


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    long_description = fh.read()

packages = find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels"]

setup(
    name="fastkd",
    version=_version(),
    description="Exact, fast ensemble knowledge distillation for CTR prediction in PyTorch",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"fastkd.kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23",
        "xxhash>=3.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "triton": ["triton>=3.0; platform_system == 'Linux'"],
        "data": ["pandas>=1.5", "pyarrow>=12"],
        "report": ["matplotlib>=3.5"],
        # side-by-side throughput comparison (bench/student_throughput.py)
        "bench": ["pytest-benchmark>=4", "deepctr-torch>=0.3", "requests"],
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "pandas>=1.5",
            "pyarrow>=12",
            "matplotlib>=3.5",
            "scikit-learn>=1.2",
            "mmh3>=4",
            # the Triton kernels are tested on the CPU under TRITON_INTERPRET=1
            "triton>=3.0; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": ["fastkd=fastkd.cli:main"]},
    license="Apache-2.0",
)

"""Build script for fastkd.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed
as ``fastkd.kernels``: a top-level module named ``kernels`` would collide with the PyPI
distribution of that name.

Native hashing (csrc/, pybind11, no torch at build time):

* ``fastkd._hashing`` (CPU) is always built. It is optional -- a failed compile leaves the
  pure-Python fallback (``fastkd.hashing.NATIVE is False``) -- unless ``FASTKD_STRICT_BUILD=1`` or
  ``CI=true``, where a failed compile fails the install.
* ``fastkd._hashing_cuda`` is built when nvcc is found (``$CUDA_HOME/bin/nvcc`` or on ``PATH``);
  ``FASTKD_CUDA=0`` skips it, ``FASTKD_CUDA=1`` requires it (a failure is an error). Installing never
  needs nvcc. ``FASTKD_CUDA_ARCHS`` (default ``75;80;90``, PTX for the lowest) picks the GPU targets.
  The CUDA runtime is linked statically, so importing the module needs no libcudart and touches no GPU.
"""
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "fastkd", "version.py"), encoding="utf-8") as fh:
        return re.search(r'__version__ = "([^"]+)"', fh.read()).group(1)


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    long_description = fh.read()

packages = find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels"]


# ------------------------------------------------------------------ native hashing extension
def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    return None if value == "" else value in ("1", "true", "yes", "on")


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc):
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


class _BuildExt(build_ext):
    """build_ext that first compiles an extension's ``cuda_sources`` with nvcc into extra objects."""

    def build_extension(self, ext):
        cuda_sources = getattr(ext, "cuda_sources", None)
        if cuda_sources:
            objects = []
            for src in cuda_sources:
                obj = os.path.join(self.build_temp, "cuda", os.path.basename(src) + ".o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                cmd = [ext.nvcc, *ext.nvcc_flags, "-c", src, "-o", obj]
                print(" ".join(cmd))
                try:
                    subprocess.check_call(cmd)
                except (OSError, subprocess.CalledProcessError) as exc:
                    raise CompileError(f"nvcc failed on {src}: {exc}") from exc
                objects.append(obj)
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # pybind11 is a build requirement; a bare `setup.py` without it stays pure Python
        print("fastkd: pybind11 not importable, building without the native hashing extension")
        return []
    strict = bool(_env_flag("FASTKD_STRICT_BUILD")) or os.environ.get("CI", "").lower() == "true"
    cxx_flags = ["-O3"] if not _env_flag("FASTKD_DEBUG") else ["-O0", "-g"]
    # depends: rebuild when a header changes, and ship the headers/.cu in the sdist
    headers = ["csrc/fastkd_hash.h", "csrc/hash_cpu.h", "csrc/hash_cuda.h", "csrc/encode_text.h"]
    exts = [Pybind11Extension(
        "fastkd._hashing", ["csrc/bindings.cpp", "csrc/hash_cpu.cpp", "csrc/encode_text.cpp"], include_dirs=["csrc"], depends=headers,
        cxx_std=17, extra_compile_args=[*cxx_flags, "-pthread"], extra_link_args=["-pthread"],
        optional=not strict),
        # -ffp-contract=off: Adagrad's g*g rounds before it is added, as in torch.optim, so the
        # fused step matches the reference instead of drifting by an FMA's rounding
        Pybind11Extension(
            "fastkd._embedding", ["csrc/bindings_embedding.cpp", "csrc/embedding_cpu.cpp"], include_dirs=["csrc"],
            depends=["csrc/embedding_cpu.h"], cxx_std=17,
            extra_compile_args=[*cxx_flags, "-pthread", "-fno-math-errno", "-ffp-contract=off"],
            extra_link_args=["-pthread"], optional=not strict)]
    want_cuda = _env_flag("FASTKD_CUDA")
    nvcc = _find_nvcc() if want_cuda is not False else None
    if want_cuda and nvcc is None:
        raise RuntimeError("FASTKD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    if nvcc is not None:
        home = _cuda_home(nvcc)
        archs = [a.strip() for a in os.environ.get("FASTKD_CUDA_ARCHS", "75;80;90").replace(",", ";").split(";")
                 if a.strip()]
        gencode = []
        for i, arch in enumerate(archs):
            code = f"[sm_{arch},compute_{arch}]" if i == 0 else f"sm_{arch}"  # PTX of the lowest: newer GPUs JIT it
            gencode += ["-gencode", f"arch=compute_{arch},code={code}"]
        lib_dirs = [d for d in (os.path.join(home, "lib64"), os.path.join(home, "targets", "x86_64-linux", "lib"))
                    if os.path.isdir(d)]
        ext = Pybind11Extension(
            "fastkd._hashing_cuda", ["csrc/bindings_cuda.cpp"], include_dirs=["csrc"], cxx_std=17,
            depends=headers + ["csrc/hash_cuda.cu"],
            extra_compile_args=list(cxx_flags), library_dirs=lib_dirs,
            # static runtime: no libcudart needed at import; the driver is loaded on the first launch
            libraries=["cudart_static", "rt", "dl", "pthread"], optional=not want_cuda)
        ext.cuda_sources = ["csrc/hash_cuda.cu"]
        ext.nvcc = nvcc
        ext.nvcc_flags = ["-std=c++17", *cxx_flags, "-Icsrc", "-Xcompiler", "-fPIC", *gencode]
        exts.append(ext)
    return exts

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
        # distillation inside other trainers' fit (fastkd.integration, docs/integration.md)
        "deepctr": ["deepctr-torch==0.3.0"],
        "fuxictr": ["fuxictr==2.3.10", "polars==1.44.2"],  # pulls ray[data]
        # fastkd export's ONNX file and onnxruntime (docs/serving.md); TorchScript needs nothing extra
        "serving": ["onnx>=1.18", "onnxruntime>=1.20", "onnxscript>=0.5"],
        # side-by-side throughput comparison (bench/student_throughput.py)
        "bench": ["pytest-benchmark>=4", "deepctr-torch>=0.3", "requests", "polars>=1.0", "scikit-learn>=1.2"],
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "pandas>=1.5",
            "pyarrow>=12",
            "matplotlib>=3.5",
            "scikit-learn>=1.2",
            "mmh3>=4",
            # ONNX export and onnxruntime (tests/test_serving.py skips without them)
            "onnx>=1.18", "onnxruntime>=1.20", "onnxscript>=0.5",
            # the Triton kernels are tested on the CPU under TRITON_INTERPRET=1
            "triton>=3.0; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": ["fastkd=fastkd.cli:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt},
    license="Apache-2.0",
)

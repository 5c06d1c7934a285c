# Two commands matter: `make demo` (set up, then run the main job) and `make test`.
# Everything installs into .venv inside the repository; a second run only re-checks the stamp.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastkd-installed
# torch pinned exactly: this version's CPU wheel lies on disk; a looser pin downloads a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo test bench clean cuda-check

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m fastkd demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pytest -q bench --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds
	$(PY) bench/epoch_cost.py
	$(PY) bench/student_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks

# Compile the CUDA sources with nvcc for every shipped architecture, so they cannot rot on
# GPU-less CI (the install builds them too when nvcc is found; this needs no Python env).
NVCC ?= nvcc
CUDA_ARCHS ?= 75 80 90
cuda-check:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(NVCC) -std=c++17 -O3 -Icsrc -Xcompiler -fPIC,-Wall $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
		-c csrc/hash_cuda.cu -o "$$tmp/hash_cuda.o"
	$(CXX) -std=c++17 -O3 -Wall -Icsrc -fsyntax-only csrc/hash_cpu.cpp
	@echo "cuda-check: csrc/hash_cuda.cu compiles for sm_$(CUDA_ARCHS)"

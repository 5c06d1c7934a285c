# Two commands matter: `make demo` (set up, then run the main job) and `make test`.
# Everything installs into .venv inside the repository; a second run only re-checks the stamp.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastkd-installed
# torch pinned exactly: this version's CPU wheel lies on disk; a looser pin downloads a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo test bench clean

$(STAMP): setup.py pyproject.toml
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

# Two commands do all the setup on a fresh machine:
#   make demo   # venv + deps, then the main job on the embedded Wikipedia excerpt
#   make test   # venv + deps, then lint (ruff format --check, ruff check) and the whole test suite
#   make test-fast  # the fast tier alone: in-process tests, under 2 minutes
# On CPU machines torch is pinned to the local 2.13.0 wheel; GPU users pass their own:
#   make demo TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: venv system-deps demo lint test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# System packages pip cannot provide: OpenMPI (mpi4py bundles no MPI), munge + Slurm (the Slurm tests).
system-deps:
	@bash .ci/system-deps.sh

demo: $(STAMP) system-deps
	$(PY) -m pipeline.demo --output $(DEMO_OUT)

# Formatting and lint (ruff, configured in pyproject.toml); `ruff format .` and `ruff check --fix .` repair most of it.
lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q

# The fast tier: in-process tests only (no launchers, kill/resume, demo, MPI or Slurm), under 2 minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not cluster"

bench: $(STAMP)
	$(PY) bench/bench_data.py

clean:
	rm -rf $(VENV) runs .cache

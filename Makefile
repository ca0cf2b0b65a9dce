# Two commands do all the setup on a fresh machine:
#   make demo   # venv + deps, then the main job on the embedded Wikipedia excerpt
#   make test   # venv + deps, then lint (ruff format --check, ruff check, mypy) and the whole test suite
#   make test-fast  # the fast tier alone: in-process tests, under 2 minutes
#   make bench      # five CPU benchmarks at small sizes, a few minutes; `make bench-all`: all twelve
# On CPU machines torch is pinned to the local 2.13.0 wheel; GPU users pass their own:
#   make demo TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
BENCH_OUT ?= runs/bench

.PHONY: venv system-deps demo lint test test-fast bench bench-all clean

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

# Formatting, lint and types (ruff and mypy, configured in pyproject.toml); `ruff format .` and `ruff check --fix .`
# repair most of the first two.
lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q

# The fast tier: in-process tests only (no launchers, kill/resume, demo, MPI or Slurm), under 2 minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not cluster"

# CPU benchmarks at small sizes, each printing its table (the sizes docs/performance.md reports are each script's
# defaults: `python bench/SCRIPT.py --help`). Data they build stays under $(BENCH_OUT) and is reused.
# `make bench`: the five quickest, a few minutes on 2 cores.
bench: $(STAMP)
	$(PY) bench/bench_data.py --sizes 10 --repeats 1 --vocab-size 8000
	$(PY) bench/bench_vocab.py --samples 10000 100000 --corpus-sentences 200000 --vocab-size 8000
	$(PY) bench/bench_loader.py --dupe-factor 1 --batches 500 --work $(BENCH_OUT)/loader
	$(PY) bench/bench_model.py --quick --configs albert-tiny
	$(PY) bench/bench_fused.py --configs albert-tiny --precisions bf16 --steps 3

# `make bench-all`: those and the other seven: the profile notes (fixed sizes), the scaled-down cluster jobs of
# albert-data (needs strace), JSON lines against Parquet input, static against dynamic masking, dedup's cost, the probe's learning curve and albert-pretrain on 2 ranks (both on the demo's data,
# prepared once); roughly 10 minutes more on 2 cores.
bench-all: bench
	$(PY) bench/bench_ops.py
	if command -v strace >/dev/null; then \
	  $(PY) bench/bench_scale.py --mb 8 --xml-mb 4 --wiki-files 2 --no-mpi --no-defaults --work $(BENCH_OUT)/scale; \
	else echo "bench/bench_scale.py skipped: it needs strace (apt-get install strace)"; fi
	$(PY) bench/bench_formats.py --mb 5 --repeats 1
	$(PY) bench/bench_masking.py --repeats 1 --mask-seconds 1
	$(PY) bench/bench_dedup.py --documents 50000 --work $(BENCH_OUT)/dedup
	$(PY) bench/bench_learning.py --corpus wikipedia-excerpt --finetune --steps 40 --every 20 --folds 2 --epochs 1 --work $(BENCH_OUT)/demo --data-dir $(BENCH_OUT)/demo/data
	$(PY) bench/bench_engine.py --configs albert-tiny --precisions bf16 --steps 8 --work $(BENCH_OUT)/demo

clean:
	rm -rf $(VENV) runs .cache

# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
FG     := $(VENV)/bin/fisherguard
TORCH  := torch==2.13.0
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

.PHONY: demo test data install clean-runs table-defenses table-fisher bench bench-full bench-floor

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU build, so no dependency can pull another torch
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(VENV)/.installed

data: install
	$(FG) data fetch fashion-mnist

demo: data
	$(FG) run configs/demo.yaml --out runs/demo --resume

test: data
	$(PY) -m pytest -q

# Long experiments (not part of the tests). Both resume where a killed run stopped.
table-defenses: data
	$(FG) run configs/fmnist-reduced.yaml --out runs/fmnist-reduced --resume

table-fisher: data
	$(FG) run configs/fisher-reduced.yaml --seeds 0,1,2 --out runs/fisher-reduced --resume

# Benchmarks (spec performance.md §8–§9), not part of `make test`. `bench`: targets 1 and 2 in the
# labelled quick mode (E = 2), then the Flower comparison when benchmarks/flower_bench.py exists;
# `bench-full`: the 50-round paper run once, with progress (BENCH_ARGS="--workers 1" etc. to vary);
# `bench-floor`: the convolution-kernel floor of that run on this CPU (also inside `bench`).
bench: data
	$(PY) benchmarks/bench.py --quick $(BENCH_ARGS)
	$(PY) benchmarks/kernel_floor.py
	@if [ -f benchmarks/flower_bench.py ]; then $(PY) benchmarks/flower_bench.py $(FLOWER_BENCH_ARGS); fi

bench-floor: install
	$(PY) benchmarks/kernel_floor.py $(FLOOR_ARGS)

bench-full: data
	$(PY) benchmarks/bench.py --full $(BENCH_ARGS)

clean-runs:
	rm -rf runs

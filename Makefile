# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
FG     := $(VENV)/bin/fisherguard
TORCH  := torch==2.13.0
# Exact versions of everything the test and demo environments install (torch included), so a new
# upstream release cannot change them; `make lock` regenerates it, `make test-latest` runs the
# suite against the newest versions the pyproject ranges allow.
LOCK   := requirements/lock.txt
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

.PHONY: results-doc demo test test-fast test-integration test-flower test-latest lock data install clean-runs fuzz chaos table-defenses table-fisher table-attacks table-forgery bench bench-full bench-floor bench-attacks

$(VENV)/.installed: pyproject.toml $(LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools wheel
	# torch first, pinned to the local CPU build, so no dependency can pull another torch
	$(PY) -m pip install -q $(TORCH)
	# every other package at its locked version; the package itself builds with the locked setuptools
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e '.[test]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(VENV)/.installed

data: install
	$(FG) data fetch fashion-mnist

demo: data
	$(FG) run configs/demo.yaml --out runs/demo --resume

test: data
	$(PY) -m pytest -q

# Issue 19's robustness figures (not part of `make test`, which runs a small sample of each).
# fuzz: >= 1,000 hostile rounds per defense through `aggregate` (hypothesis), a per-defense table
# (FUZZ_ARGS="--examples 5000 --random", or defense names); chaos: SIGKILLs at seeded random
# moments of a tiny run, inside checkpoint and results writes too, then --resume, checked
# bit-identical to the uninterrupted run (CHAOS_ARGS="--kills 30 --seed 1").
fuzz: install
	OMP_NUM_THREADS=1 $(PY) tools/fuzz.py $(FUZZ_ARGS)

chaos: install
	$(PY) tools/chaos.py $(CHAOS_ARGS)

# The same suite by class (pytest markers, tests/conftest.py); `make test` runs all three.
# test-fast: the unit tests, under a minute, no data download; test-integration: engine runs,
# real data (Fashion-MNIST, the shared USPS files), subprocesses and workers; test-flower: Flower.
# The unit tests' tensors are small: one torch thread does them as fast, and on a busy 2-core
# machine waiting for a second one more than doubled their time (17-20 s against 41-52 s).
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m unit

test-integration: data
	$(PY) -m pytest -q -m integration

test-flower: install
	$(PY) -m pytest -q -m flower

# The suite against the newest releases the package's ranges admit (not part of .ci/run): drift is
# seen on purpose here, in its own venv, before `make lock` adopts it.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST)/bin/python -m pip freeze --exclude fisherguard > $(LATEST)/resolved.txt
	@echo "resolved: $$(grep -E '^(flwr|numpy|scipy|scikit-learn|ray|pytest)==' $(LATEST)/resolved.txt | tr '\n' ' ')"
	$(LATEST)/bin/fisherguard data fetch fashion-mnist
	$(LATEST)/bin/python -m pytest -q

# Regenerate the lock from the pyproject ranges in a throw-away venv (torch stays the local 2.13.0).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q '.[test]'
	{ echo "# The test and demo environments' exact versions; regenerate with \`make lock\`."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude fisherguard | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock build

# Long experiments (not part of the tests). Both resume where a killed run stopped.
table-defenses: data
	$(FG) run configs/fmnist-reduced.yaml --out runs/fmnist-reduced --resume

table-fisher: data
	$(FG) run configs/fisher-reduced.yaml --seeds 0,1,2 --out runs/fisher-reduced --resume

table-attacks: data
	$(FG) run configs/attacks-demo.yaml --out runs/attacks-demo --resume

# Issue 15's outcome matrix: every Fisher forgery and no attack × FDCR (3 settings) and SDFC (2),
# plus the reference columns (FedAvg, Multi-Krum, FLTrust) on the rows they can see; reduced
# Fashion-MNIST, seeds 0 and 1: 218 runs (109 cells) of 3-10 min, a multi-sitting campaign that resumes.
table-forgery: data
	-$(FG) run configs/forgery-reference.yaml --out runs/forgery-matrix --resume --keep-going --seeds 0,1
	-$(FG) run configs/forgery-matrix.yaml --out runs/forgery-matrix --resume --keep-going --seeds 0,1
	$(FG) table runs/forgery-matrix --by row --metrics A,ASR,attacker_share --compact --markdown --order configs/forgery-matrix.yaml,configs/forgery-reference.yaml
	$(FG) table runs/forgery-matrix --by row --metrics att_refused,ben_refused,fired --compact --markdown --order configs/forgery-matrix.yaml,configs/forgery-reference.yaml

# Benchmarks (spec performance.md §8–§9), not part of `make test`. `bench`: targets 1 and 2 in the
# labelled quick mode (E = 2), then the Flower comparison when benchmarks/flower_bench.py exists;
# `bench-full`: the kernel floor, then the 50-round paper run once, with progress and the round split (BENCH_ARGS="--workers 1" etc. to vary);
# `bench-floor`: the convolution-kernel floor of that run on this CPU (also inside `bench`).
bench: data
	$(PY) benchmarks/bench.py --quick $(BENCH_ARGS)
	$(PY) benchmarks/kernel_floor.py
	@if [ -f benchmarks/flower_bench.py ]; then $(PY) benchmarks/flower_bench.py $(FLOWER_BENCH_ARGS); fi

# `bench-attacks`: one round per attack against BadNets on the demo setting (CPU s, round-robin),
# PASS/MISS for the < 5 % target of data- and upload-transforming attacks.
bench-attacks: data
	$(PY) benchmarks/attack_cost.py $(BENCH_ARGS)

bench-floor: install
	$(PY) benchmarks/kernel_floor.py $(FLOOR_ARGS)

bench-full: data
	$(PY) benchmarks/kernel_floor.py $(FLOOR_ARGS)
	$(PY) benchmarks/bench.py --full $(BENCH_ARGS)

# The results document: docs/report/index.md (published-table verdicts, each results/ directory's
# table, plots as SVG) regenerated from the committed runs under results/ alone.
RESULT_DIRS = $(filter-out results/report/,$(sort $(wildcard results/*/)))
results-doc: install
	rm -rf docs/report
	$(FG) report $(RESULT_DIRS) --out docs/report --plots overview --formats svg

clean-runs:
	rm -rf runs

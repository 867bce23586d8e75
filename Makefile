# Every target sets itself up from a fresh clone: only Python 3.11, make and git needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: test demo check bench bench-quick soak clean lock release

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

# Four workers by default: the process tests spend most of their time waiting on leases, fences and their
# children (1.4 of 2 cores busy at -n 3), so four keep `make test` well under 10 minutes on 2 cores
# (measured: 517 s at -n 3, 452 s at -n 4). PYTEST_ARGS="-n 0": one process.
PYTEST_ARGS ?= -n 4

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/cosmigrate demo

check: $(STAMP)
	$(BIN)/ruff check cosmigrate tests bench
	$(BIN)/mypy cosmigrate

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/sandbox_bench.py
	$(BIN)/python bench/run.py
	$(BIN)/python bench/capture_memory.py
	$(BIN)/python bench/sandbox_memory.py

bench-quick: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --quick

# Slow leaks: the live workload for COSMIGRATE_SOAK_MINUTES (30) at half the last bench's highest sustained rate,
# SIGHUP and writer stop/start every sixth of the run; bench/results/soak.json. SOAK_ARGS=--short: 3 minutes.
soak: $(BENCH_STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# Refresh the hashed pins (deploy/release/*.lock) from the versions the tests run with: see deploy/release/lock.py.
lock: $(STAMP)
	$(BIN)/python deploy/release/lock.py

# Build dist/cosmigrate-<version>.tar.gz with the pinned build backend; prints the artefact and its sha256.
release:
	bash deploy/release/build.sh dist

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The two commands: `make run` (start it) and `make test` (test it). Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` needs only what running needs; the dev and bench extras are for test/bench
RUN_STAMP := $(VENV)/.installed-run

# the quick loop: everything but the slow, fault, browser and multihost tests, and the
# PostgreSQL twin of a test that runs on both databases (PostgreSQL-only tests still run)
FAST := not slow and not fault and not browser and not multihost and not postgres_twin

.PHONY: run test test-fast lint bench clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP) $(RUN_STAMP)

# the embedded Redis unless REDIS_URL is set explicitly (see README, "Ports")
run: $(RUN_STAMP)
	$(BIN)/autonomy up --demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP) lint
	scripts/ensure-chromium
	$(BIN)/pytest $(PYTEST_ARGS)

# under 2 minutes: no browser, no real stack, no fault injection; still imports every module
test-fast: $(STAMP)
	$(BIN)/pytest -m "$(FAST)" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .autonomy autonomy.db* test-output

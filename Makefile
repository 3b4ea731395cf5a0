# fleetworks: `make up` runs the fleet, `make test` runs the whole suite.
# Both create .venv and install pinned dependencies (constraints.txt) first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEPS   := pyproject.toml constraints.txt

.PHONY: install dev up demo test test-slow lint bench clean

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

dev: $(VENV)/.installed-dev

up: install
	$(BIN)/fleetworks up

demo: install
	$(BIN)/fleetworks demo

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: dev
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/fleetworks bench throughput

clean:
	rm -rf $(VENV) .fleet .pytest_cache .mypy_cache .ruff_cache .hypothesis

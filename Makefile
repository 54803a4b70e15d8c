# Turnout: `make up` runs a local deployment, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ARGS ?=

.PHONY: install install-test up test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q -e .

install-test: $(BIN)/python
	$(PIP) install -q -e '.[test]'

up: install
	$(BIN)/turnout up $(ARGS)

test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS)

lint: install-test
	$(BIN)/ruff check .

bench: install-test
	$(BIN)/python bench/overhead.py $(ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info

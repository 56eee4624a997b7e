# Two commands for a newcomer: `make quickstart` and `make test`. Both create .venv on first use.
#
# torch comes first and separately so pip never resolves it to a multi-GB CUDA build on a CPU machine:
#   default              TORCH_SPEC=torch==2.13.0 from the configured index (a CPU wheel where one is provided)
#   a CPU-only machine   make quickstart TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   an NVIDIA GPU        make quickstart TORCH_INDEX=https://download.pytorch.org/whl/cu128 EXTRAS=dev,qlora
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorafit-installed

.PHONY: install quickstart test test-fast clean-venv

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c requirements/lock-cpu.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lorafit train --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)

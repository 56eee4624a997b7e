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
# Test processes (pytest-xdist): CI has 2 cores; each test process runs torch on one thread (tests/conftest.py).
# Whole files go to one process (--dist loadfile) so a file's shared fixtures (one reference run) are built once.
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorafit-installed

# The oldest transformers lorafit supports (pyproject.toml: transformers>=5.19,<6): `make test-oldest` installs it
# into a folder of its own, put first on the path, and runs the core tests against it (CI runs it after `make test`).
OLDEST_TRANSFORMERS ?= 5.19.0
OLDEST_DIR := $(VENV)/transformers-$(OLDEST_TRANSFORMERS)
CORE_TESTS := tests/test_training.py tests/test_loop_parity.py tests/test_objectives.py tests/test_preference.py \
	tests/test_labels.py tests/test_templates.py tests/test_resume.py tests/test_artifact.py \
	tests/test_merge_generate.py tests/test_host_sync.py tests/test_pinned_curves.py

.PHONY: install quickstart test test-fast test-oldest clean-venv

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c requirements/lock-cpu.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lorafit train --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

test-oldest: $(STAMP)
	test -d $(OLDEST_DIR) || $(BIN)/python -m pip install --quiet --no-deps --target $(OLDEST_DIR) "transformers==$(OLDEST_TRANSFORMERS)"
	PYTHONPATH=$(OLDEST_DIR) $(BIN)/python -c "import transformers as t; assert t.__version__ == '$(OLDEST_TRANSFORMERS)', t.__file__; print('transformers', t.__version__, 'from', t.__file__)"
	PYTHONPATH=$(OLDEST_DIR) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(CORE_TESTS)

clean-venv:
	rm -rf $(VENV)

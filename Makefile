# `make demo` and `make test` work on a fresh machine with Python 3.10+ and access to PyPI.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ettin-installed
# uv installs the venv from uv.lock; a uv on PATH is used, else one is bootstrapped with pip.
UV_BOOT := .tools/uv
UV     ?= $(shell command -v uv 2>/dev/null || echo $(UV_BOOT)/bin/uv)

.PHONY: setup demo test test-fast lock clean-demo

setup: $(STAMP)

$(UV_BOOT)/bin/uv:
	$(PYTHON) -m pip install --disable-pip-version-check -q --target $(UV_BOOT) 'uv==0.13.9'

# Reinstalled only when the package definition or the lock changes; the venv itself is reused.
# --locked refuses a uv.lock that no longer matches pyproject.toml (run `make lock`).
$(STAMP): pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --extra dev --extra eval --python $(PYTHON)
	touch $(STAMP)

# After editing dependencies: re-resolve, and write the same set for plain pip (docs/install.md).
lock: | $(UV)
	$(UV) lock --python $(PYTHON)
	$(UV) export --frozen --extra dev --extra eval --no-emit-project --no-header -o requirements.lock > /dev/null

demo: setup
	$(PY) data_tools/demo.py

# Both cores: one pytest-xdist worker each, a test file per worker at a time (its module-scoped runs are made
# once), in the order tests/conftest.py gives (longest first; xdist would otherwise reorder the files by their
# number of tests); the 15 slowest tests are printed at the end (pyproject.toml). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST) tests

# The inner loop: everything but the tests marked slow (real training runs).
test-fast: setup
	$(PYTEST) -m "not slow" tests

clean-demo:
	rm -rf demo_runs

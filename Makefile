# `make demo` and `make test` work on a fresh machine with Python 3.10+ and access to PyPI.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ettin-installed

.PHONY: setup demo test clean-demo

setup: $(STAMP)

# Reinstalled only when the package definition changes; the venv itself is reused.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) data_tools/demo.py

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean-demo:
	rm -rf demo_runs

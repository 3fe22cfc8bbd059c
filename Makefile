# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the project's virtual environment from pyproject.toml and
# constraints.txt; nothing has to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.robustft-installed

.PHONY: demo demo-quick test test-fast lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robustft demo

demo-quick: $(STAMP)
	$(VENV)/bin/robustft demo --quick

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

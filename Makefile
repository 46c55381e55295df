# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv in the repo root and install everything the project needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Pin torch first: the CPU wheel 2.13.0 (an unpinned torch pulls gigabytes of CUDA packages).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dyrate demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info

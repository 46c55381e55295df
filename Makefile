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
	$(PY) -m pip install -q -e ".[dev,lmms]"
	# lmms-eval pulls torchvision 0.28.0 (and timm, which needs it). PyPI's wheel is built for CUDA
	# torch: next to the CPU torch its import fails and takes transformers' image processors down.
	# dyrate and the lmms-eval parts it uses need neither, so CPU-only set-ups drop them.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" || $(PY) -m pip uninstall -q -y torchvision timm
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dyrate demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info

# Set up a virtual environment and run the pipeline or the tests.
#   make repro          create .venv, install, `dvc repro` (the default params download CIFAR-10)
#   make repro-offline  the same on the generated synthetic data set (no network needed)
#   make test           create .venv, install, run the whole test suite
# The install runs again only when pyproject.toml changes (a stamp file in .venv records the last one).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed

# The stages' commands say `python -m stages.<name>`: DVC runs them through the shell, so the venv's python
# must come first on PATH (DVC does not add its own interpreter's folder).
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro repro-offline test clean-venv

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

# Sets data.source to synthetic in params.yaml (dvc exp run applies -S to the workspace and records an
# experiment); `git checkout params.yaml` goes back to the CIFAR-10 default.
repro-offline: $(STAMP)
	$(BIN)/dvc exp run -S data.source=synthetic

test: $(STAMP)
	$(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)

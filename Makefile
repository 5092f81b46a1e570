# Set up a virtual environment and run the pipeline or the tests.
#   make repro          create .venv, install, `dvc repro` (the default params download CIFAR-10)
#   make repro-offline  the pipeline on the generated synthetic data set, a small recipe (no network needed)
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

# The offline preset (presets/offline.yaml: the synthetic set, a narrow airnet; about a minute) through dvc exp run,
# which writes its values into params.yaml and records an experiment; `git checkout params.yaml` goes back.
repro-offline: $(STAMP)
	$(BIN)/python tools/preset.py offline

test: $(STAMP)
	$(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)

# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Each creates the virtual environment it needs on first use. TORCH picks the torch to test with
# (`make test TORCH=torch==2.14.1`): the stamp is named after it, so another TORCH reinstalls.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | tr -c 'A-Za-z0-9.+-' '_')

.PHONY: run test clean

$(STAMP): pyproject.toml setup.py requirements-dev.txt
	rm -f $(VENV)/.installed*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements-dev.txt
	touch $@

run: $(STAMP)
	$(BIN)/python -m fromage_fused.bench --quick

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info

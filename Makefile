# The two commands of the README: `make run` (the main job) and `make test` (the tests); `make docs`
# builds the documentation site. Each creates the virtual environment it needs on first use, with
# only what it needs: `run` the package, its [bench] extra (no Triton where torch does not bring
# it) and timm's optimizers (the LARS and LAMB rows compare with them), `test` the [test] extra (the integrations too) and timm where a matching torchvision loads,
# `docs` the [docs] extra. TORCH picks the torch (`make test TORCH=torch==2.14.1`): the stamps are
# named after it, so another TORCH reinstalls; TORCH_INDEX, a package index for it (such as
# PyTorch's CPU-only one). Everything after torch is installed with torch pinned, so no extra's
# requirement can replace the torch under test.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TIMM := timm==1.0.31
BIN := $(VENV)/bin
TAG := $(shell printf '%s' '$(TORCH)' | tr -c 'A-Za-z0-9.+-' '_')
STAMP := $(VENV)/.installed-$(TAG)
RUN_STAMP := $(VENV)/.installed-run-$(TAG)
DOCS_STAMP := $(VENV)/.installed-docs-$(TAG)
PIN := $(VENV)/torch-pin.txt
# The suite's duration on a 2-core CPU (the first run also builds the C++ extension, 1-2 minutes).
SUITE_TIME := up to 17 minutes on a 2-core CPU (measured while other jobs loaded it; less on an idle one)

.PHONY: run test docs clean

# A virtual environment with pip's build tools and $(TORCH); $(PIN) pins the torch installed (the
# distribution's version: torch.__version__ may carry a local label, such as +cu132, that its metadata lacks).
define venv_with_torch
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )"$(TORCH)"
	$(BIN)/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(PIN)
endef

$(STAMP): pyproject.toml setup.py requirements-dev.txt
	rm -f $(VENV)/.installed*
	$(venv_with_torch)
	$(BIN)/python -m pip install -q -c $(PIN) --no-build-isolation -r requirements-dev.txt
	@# timm imports torchvision, whose wheels fit one torch release each (torchvision 0.N+15 for torch 2.N).
	@# Without one, timm is installed alone: the LARS/LAMB parity tests load its optimizer files, which need
	@# only torch, and its integration test skips. The parity tests were checked against this timm.
	$(BIN)/python -m pip install -q -c $(PIN) "$(TIMM)" "$$($(BIN)/python -c "import torch; print('torchvision==0.%d.*' % (int(torch.__version__.split('.')[1]) + 15))")" \
		&& $(BIN)/python -c "import timm" >/dev/null 2>&1 \
		|| { $(BIN)/python -m pip uninstall -q -y timm torchvision >/dev/null 2>&1; \
		     $(BIN)/python -m pip install -q --no-deps "$(TIMM)"; \
		     echo "make: no torchvision loads with $(TORCH) here: timm is installed without it (its integration test skips)"; }
	touch $@

$(RUN_STAMP): pyproject.toml setup.py
	rm -f $(VENV)/.installed-run*
	$(venv_with_torch)
	$(BIN)/python -m pip install -q -c $(PIN) --no-build-isolation -e ".[bench]"
	@# What the LARS and LAMB rows compare with: timm's optimizer files need only torch (its package
	@# would bring a torchvision that pins, and so may replace, the torch under test).
	$(BIN)/python -m pip install -q --no-deps "$(TIMM)"
	touch $@

$(DOCS_STAMP): pyproject.toml setup.py
	rm -f $(VENV)/.installed-docs*
	$(venv_with_torch)
	$(BIN)/python -m pip install -q -c $(PIN) --no-build-isolation -e ".[docs]"
	touch $@

run: $(RUN_STAMP)
	$(BIN)/python -m fromage_fused.bench --quick

test: $(STAMP)
	@echo "make test: the suite takes $(SUITE_TIME)"
	@start=$$(date +%s); $(BIN)/python -m pytest; status=$$?; \
		echo "make test: the suite took $$(( $$(date +%s) - start )) s here"; exit $$status

docs: $(DOCS_STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) build dist *.egg-info

# researchlab: `make demo` runs the main job, `make test` checks and tests everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export JAX_PLATFORMS ?= cpu
export MPLBACKEND ?= Agg

.PHONY: install demo test check sync-check readme nbtest pytest lab bench lint clean browser-deps quarto docs docs-serve tutorials

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/rlab demo

test: check browser-deps quarto nbtest pytest

check: install sync-check lint

sync-check: install
	@bash tools/check_sync.sh

readme: install
	$(BIN)/python tools/readme.py > README.md

lint: install
	$(BIN)/ruff check researchlab tests bench tools nbs

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: install
	@$(BIN)/python -m pytest -q --timeout=900 tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treated as a failure"; fi; exit $$rc

# The browser test (tests/test_browser.py) drives JupyterLab in Debian's chromium; it skips when chromium is
# missing. In CI (CI=true, root) install it from Debian's packages first, so the test really runs.
browser-deps:
	@if [ "$${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium for the browser test"; \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium install failed: the browser test will skip"; \
	fi

# Quarto renders the docs site. In CI (and wherever the project's bundled installer is beside the checkout)
# it is installed into the project-local .cache/quarto, so `make test` can build and check the site;
# elsewhere get it from quarto.org (tools/docs.py says how) and the site test skips, saying why.
QUARTO_INSTALLER ?= ../shared/tools/quarto/install.sh
quarto:
	@if command -v quarto >/dev/null 2>&1 || [ -x .cache/quarto/bin/quarto ]; then :; \
	elif [ -f $(QUARTO_INSTALLER) ]; then echo "installing quarto into .cache/quarto"; \
	  bash $(QUARTO_INSTALLER) .cache/quarto >/dev/null || echo "quarto install failed: the docs site test will skip"; \
	else echo "no quarto and no installer at $(QUARTO_INSTALLER): the docs site test will skip"; fi

# Re-run the tutorials at full budget and keep their outputs (plots, GIF preview) for the docs site.
tutorials: install
	$(BIN)/python tools/run_tutorials.py
	$(BIN)/nbdev_clean

docs: install
	$(BIN)/python tools/docs.py

docs-serve: docs
	@echo "serving _docs on http://127.0.0.1:8000 (Ctrl-C stops)"
	$(BIN)/python -m http.server --directory _docs --bind 127.0.0.1 8000

lab: install
	$(BIN)/jupyter lab nbs

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) _proc _docs .pytest_cache .hypothesis .cache

# researchlab: `make demo` runs the main job, `make test` checks and tests everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export JAX_PLATFORMS ?= cpu
export MPLBACKEND ?= Agg

.PHONY: install demo test check sync-check readme nbtest pytest lab bench lint clean browser-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/rlab demo

test: check browser-deps nbtest pytest

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

lab: install
	$(BIN)/jupyter lab nbs

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) _proc _docs .pytest_cache .hypothesis

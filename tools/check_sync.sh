#!/usr/bin/env bash
# Fail when nbdev_export or nbdev_clean would change a tracked file (or add an untracked module),
# or when README.md differs from what nbs/index.ipynb produces. Prints which files and how to fix.
set -uo pipefail
BIN=${BIN:-.venv/bin}
snapshot() { git ls-files -z --cached --others --exclude-standard -- researchlab nbs README.md \
  | xargs -0 sha1sum 2>/dev/null | sort -k2; }
before=$(snapshot)
"$BIN/nbdev_export" || { echo "nbdev_export failed"; exit 1; }
"$BIN/nbdev_clean" || { echo "nbdev_clean failed"; exit 1; }
"$BIN/python" tools/readme.py > README.md.tmp && mv README.md.tmp README.md
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "ERROR: the generated files are out of sync with the notebooks."
  echo "These files change when running nbdev_export, nbdev_clean and tools/readme.py:"
  diff <(echo "$before") <(echo "$after") | sed -n 's/^[<>] [0-9a-f]*  /  /p' | sort -u
  echo "Fix: edit the notebook (never the generated module), then run"
  echo "  .venv/bin/nbdev_export && .venv/bin/nbdev_clean && make readme"
  echo "and commit the result."
  exit 1
fi
echo "sync-check: notebooks, modules and README.md are in sync"

"""Build the docs site into `_docs/` from the notebooks: `make docs` (and `make docs-serve` to preview).

Quarto is looked for, in order, on PATH, in `$QUARTO` (the launcher's path) and in the project-local
prefix `.cache/quarto` (where `make test` installs it when the bundled installer is available). When
there is none, this says how to get one and exits 1 — it never lets nbdev try to install quarto itself
(nbdev would do that with sudo, then `pip install -e .` into whatever Python is on PATH).

The site is built in nbdev's steps (`nbdev_proc_nbs`, then `quarto render` of the processed copy), not
with `nbdev_docs`, because `nbdev_docs` also re-renders README.md whenever its timestamp is older than
`nbs/index.ipynb` (as on every fresh clone); README.md has one maker, `tools/readme.py`, and this
script never writes a tracked file.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / ".cache" / "quarto" / "bin" / "quarto"
HOW = """quarto was not found (looked on PATH, in $QUARTO and in .cache/quarto/bin/quarto).
Get it from https://quarto.org/docs/get-started/ (a .deb or tarball), or run
  .venv/bin/nbdev_install_quarto
and then `make docs` again (or point QUARTO=/path/to/bin/quarto at an existing one)."""


def find_quarto() -> Path | None:
    "The quarto launcher to use, or None."
    for cand in (shutil.which("quarto"), os.environ.get("QUARTO"), LOCAL):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand).resolve() if Path(cand).is_symlink() else Path(cand)
    return None


def main() -> int:
    quarto = find_quarto()
    if quarto is None:
        print(HOW, file=sys.stderr)
        return 1
    env = dict(os.environ, PATH=f"{quarto.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    bin_dir = Path(sys.executable).parent
    shutil.rmtree(ROOT / "_proc", ignore_errors=True)  # nbdev's cache misses changes outside the notebooks
    subprocess.run([str(bin_dir / "nbdev_proc_nbs")], cwd=ROOT, env=env, check=True)
    subprocess.run([str(quarto), "render", "--no-cache"], cwd=ROOT / "_proc", env=env, check=True)
    shutil.rmtree(ROOT / "_docs", ignore_errors=True)
    shutil.move(str(ROOT / "_proc" / "_docs"), str(ROOT / "_docs"))
    print(f"docs: {len(list((ROOT / '_docs').rglob('*.html')))} pages in {ROOT / '_docs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

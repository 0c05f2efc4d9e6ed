"""The docs build, up to nbdev's notebook processing (quarto itself is not installable here).

nbdev's docs step (`proc_nbs`, what `nbdev_docs`/`nbdev_preview` run before quarto) executes every
export cell, every `show_doc` cell and every cell that contains an import. A cell that mixes imports
with other code runs out of context there and fails the whole docs build, although `nbdev_test` passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PROC = "from nbdev.serve import proc_nbs; proc_nbs(force=True)"
_MIXED = "Found cells containing imports and other code"


def _copy_project(dst: Path) -> list[Path]:
    "Copy what nbdev's processing reads into `dst`; return the notebooks (relative to nbs/) it must process."
    skip = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "_proc")
    shutil.copytree(ROOT / "nbs", dst / "nbs", symlinks=True, ignore=skip)
    shutil.copytree(ROOT / "researchlab", dst / "researchlab", ignore=skip)
    for f in ("settings.ini", "_quarto.yml", "pyproject.toml"):
        shutil.copy2(ROOT / f, dst / f)
    return sorted(p.relative_to(dst / "nbs") for p in (dst / "nbs").rglob("*.ipynb"))


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], subprocess.CompletedProcess[str]]:
    "Run nbdev's docs processing once on a copy of the project."
    dst = tmp_path_factory.mktemp("docs")
    nbs = _copy_project(dst)
    env = {**os.environ, "PYTHONPATH": str(dst), "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
           "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-c", _PROC], cwd=dst, env=env, capture_output=True, text=True, timeout=900)
    return dst, nbs, r


def test_docs_processing_succeeds(processed: tuple[Path, list[Path], subprocess.CompletedProcess[str]]) -> None:
    dst, nbs, r = processed
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(nbs) >= 21 and any(nb.parts[0] == "tutorials" for nb in nbs), nbs
    missing = [str(nb) for nb in nbs if not (dst / "_proc" / nb).is_file()]
    assert not missing, f"no _proc/ output for {missing}"
    assert (dst / "_proc" / "_quarto.yml").is_file()


def test_no_cell_mixes_imports_with_code(processed: tuple[Path, list[Path], subprocess.CompletedProcess[str]]) -> None:
    "Such cells run during docs processing without the cells before them; put imports in their own cell."
    _, _, r = processed
    assert _MIXED not in r.stderr, r.stderr[r.stderr.find(_MIXED):][:2000]


def test_show_doc_cells_render(processed: tuple[Path, list[Path], subprocess.CompletedProcess[str]]) -> None:
    "Every exported name gets its rendered documentation (a markdown output) in the processed notebook."
    dst, nbs, r = processed
    assert r.returncode == 0, r.stderr[-4000:]
    n_docs, empty = 0, []
    for nb in nbs:
        for cell in json.loads((dst / "_proc" / nb).read_text())["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] != "code" or "show_doc(" not in src:
                continue
            n_docs += 1
            if not any("text/markdown" in o.get("data", {}) for o in cell.get("outputs", [])):
                empty.append(f"{nb}: {src.splitlines()[-1]}")
    assert not empty, empty
    assert n_docs >= 50, n_docs

"""The project's own guard rails: the sync check fails on drift, and `make test` cannot pass on no tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    "A clean clone of the committed project (what CI sees)."
    dst = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True)
    return dst


def _check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "tools/check_sync.sh"], cwd=repo, env={**os.environ, "BIN": BIN},
                          capture_output=True, text=True)


def test_sync_check_passes_on_clean_clone(clone: Path) -> None:
    r = _check(clone)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sync_check_fails_when_module_edited_by_hand(clone: Path) -> None:
    mod = clone / "researchlab" / "design" / "utils.py"
    mod.write_text(mod.read_text() + "\nHAND_EDIT = 1\n")
    r = _check(clone)
    assert r.returncode == 1
    assert "researchlab/design/utils.py" in r.stdout and "nbdev_export" in r.stdout


def test_sync_check_fails_when_readme_drifts(clone: Path) -> None:
    (clone / "README.md").write_text("# stale\n")
    r = _check(clone)
    assert r.returncode == 1 and "README.md" in r.stdout


def test_ci_runs_exactly_make_test() -> None:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in lines
    assert "make test" in (ROOT / "README.md").read_text()


def test_pytest_exit_5_is_a_failure(tmp_path: Path) -> None:
    "The Makefile's pytest target turns 'no tests collected' (exit 5) into a failing make."
    (tmp_path / "tests").mkdir()
    mk = (ROOT / "Makefile").read_text()
    recipe = mk[mk.index("pytest: install"):].split("\n\n")[0].replace("pytest: install", "pytest:")
    (tmp_path / "Makefile").write_text(f"BIN := {BIN}\n{recipe}\n")
    r = subprocess.run(["make", "-s", "pytest"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert "no tests" in r.stdout

"""What ran is what is tracked: cells run out of order (and one edited after it ran) in a real JupyterLab, driven
by a real browser (Debian chromium + playwright); the run's executed-cells artifact holds them as they ran.

Skipped with a reason when chromium or playwright is missing; to run it:
`apt-get install -y chromium && .venv/bin/pip install playwright` (never `playwright install`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from _lab import CHROMIUM, jupyter_lab, launch_chromium
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="chromium is not installed (apt-get install -y chromium)")

RUN = "%%rlab_run browser --uri $uri --name 2026-03-03_out-of-order\nprint('tracked with a =', a, 'and b =', b)"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, str, list[str]]]:
    "JupyterLab on 127.0.0.1 serving a git repository with one notebook; yields its URL, the store URI, the cells."
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    root = tmp_path / "root"
    root.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cells = [f'%load_ext researchlab\nuri = "{uri}"', "a = 10", "b = 2", RUN]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, root / "track.ipynb")
    env = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "T",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True)
    env.pop("MLFLOW_TRACKING_URI", None)
    with jupyter_lab(tmp_path, root, "track.ipynb", env) as url:
        yield url, uri, cells


def test_executed_cells_artifact_holds_the_cells_in_execution_order(lab: tuple[str, str, list[str]]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, uri, cells = lab
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator(".jp-StatusBar-TextItem", has_text="(ipykernel) | Idle")).to_be_visible(timeout=90_000)
            cell = lambda i: page.locator(".jp-Notebook .jp-Cell").nth(i)  # noqa: E731

            def run(i: int, count: int) -> None:
                "Run notebook cell `i` (Ctrl+Enter: run and stay) and wait for its execution count."
                cell(i).locator(".jp-Cell-inputArea").click()
                page.keyboard.press("Control+Enter")
                expect(cell(i).locator(".jp-InputPrompt")).to_have_text(f"[{count}]:", timeout=120_000)

            # out of order: setup, b, a, b again; then cell 1 is edited but not run again
            for i, count in ((0, 1), (2, 2), (1, 3), (2, 4)):
                run(i, count)
            cell(1).locator(".jp-Cell-inputArea").click()
            page.keyboard.press("Control+a")
            page.keyboard.type("a = 99  # edited after it ran")
            expect(cell(1).locator(".jp-Cell-inputArea")).to_contain_text("a = 99")
            run(3, 5)
            out = cell(3).locator(".jp-OutputArea-output", has_text="tracked with a = 10 and b = 2")
            expect(out).to_be_visible(timeout=60_000)
            banner = cell(3).locator(".jp-OutputArea-output", has_text="rlab: run '2026-03-03_out-of-order'")
            expect(banner).to_contain_text("see it: mlflow ui --backend-store-uri")
        finally:
            browser.close()

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("browser").experiment_id])[0]
    assert run.info.status == "FINISHED"
    nb = nbformat.read(client.download_artifacts(run.info.run_id, "notebook/executed-cells.ipynb",
                                                 str(Path(uri[len("sqlite:///"):]).parent)), as_version=4)
    nbformat.validate(nb)
    assert [(c.execution_count, c.source) for c in nb.cells] == [
        (1, cells[0]), (2, cells[2]), (3, cells[1]), (4, cells[2]), (5, cells[3])]

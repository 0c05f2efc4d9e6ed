"""The rlab magics in a real notebook executed headlessly by nbclient, in a real git repository, the way
Jupyter Server runs it (`JPY_SESSION_NAME` names the notebook file)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

import researchlab

CELLS = [
    "%load_ext researchlab\nimport mlflow\nfrom researchlab import Config\n"
    "class Train(Config):\n    seed: int = 0\ncfg = Train(seed=4)",
    # 1: a tracked cell: tracker visible, last expression shown, config from a notebook variable
    '%%rlab_run magic-test --uri $uri --name 2026-03-01_first-cell --config cfg\n'
    'mlflow.log_metric("x", 1.0)\nassert tracker.active_run is not None\n41 + 1',
    # 2: a tracked cell that raises
    '%%rlab_run magic-test --uri $uri --name 2026-03-01_bad-cell\nraise ValueError("boom in cell")',
    # 3: nothing left active after the error
    'assert mlflow.active_run() is None, mlflow.active_run()\nprint("no active run")',
    # 4-8: a run spanning cells, a second start refused, stop, stop again
    "%rlab_start magic-test --uri $uri --name 2026-03-01_span-cells",
    'mlflow.log_metric("y", 2.0)\nimport os\nwith open(os.environ["JPY_SESSION_NAME"], "a") as f:\n'
    '    f.write("\\n")  # the notebook is saved again while the run is open',
    "%rlab_start magic-test --uri $uri --name 2026-03-01_second",
    "%rlab_stop",
    "%rlab_stop",
    # 9: usage error
    "%rlab_start",
]


@pytest.fixture
def notebook_run(tmp_path: Path) -> tuple[nbformat.NotebookNode, str, Path]:
    "Execute the notebook once in a temp repo with a sqlite store; return it, the store URI and its path."
    env = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f'uri = "{uri}"')] + [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.cells[3].metadata["tags"] = ["raises-exception"]
    nb.cells[10].metadata["tags"] = ["raises-exception"]
    path = repo / "experiment.ipynb"
    nbformat.write(nb, path)  # saved, untracked: it enters the git patch and is logged as the notebook
    package_root = str(Path(researchlab.__file__).resolve().parents[1])  # the kernel imports this researchlab
    kernel_env = {**env, "JPY_SESSION_NAME": str(path), "JAX_PLATFORMS": "cpu",
                  "PYTHONPATH": os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    kernel_env.pop("MLFLOW_TRACKING_URI", None)
    client = NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(repo)}})
    client.execute(env=kernel_env)
    return nb, uri, path


def text_of(cell: nbformat.NotebookNode, stream: str = "stdout") -> str:
    "What a cell showed on `stream`, its result, and its error (MLflow's log lines go to stderr)."
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream" and out.name == stream:
            parts.append(out.text)
        elif out.output_type == "execute_result":
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "".join(parts)


def test_magics_in_a_headless_notebook(notebook_run: tuple[nbformat.NotebookNode, str, Path]) -> None:
    nb, uri, path = notebook_run
    out = [text_of(c) for c in nb.cells]
    assert out[2] == "42"
    assert out[3] == "ValueError: boom in cell"
    assert out[4] == "no active run\n"
    assert "started run '2026-03-01_span-cells'" in out[5]
    assert "'2026-03-01_span-cells'" in out[7] and "already active; nothing started" in out[7]
    assert "run '2026-03-01_span-cells' ended FINISHED" in out[8]
    assert "no run started with %rlab_start is active" in out[9]
    assert "UsageError" in text_of(nb.cells[10], "stderr") and "experiment" in text_of(nb.cells[10], "stderr")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("magic-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"2026-03-01_first-cell", "2026-03-01_bad-cell", "2026-03-01_span-cells"}
    first, bad, span = runs["2026-03-01_first-cell"], runs["2026-03-01_bad-cell"], runs["2026-03-01_span-cells"]
    assert (first.info.status, bad.info.status, span.info.status) == ("FINISHED", "FAILED", "FINISHED")
    assert first.data.params == {"seed": "4"} and first.data.metrics == {"x": 1.0}
    assert span.data.metrics == {"y": 2.0}
    # the notebook file is logged, and the git state recorded although MLflow records none under Jupyter
    assert first.data.tags["rlab.notebook"] == str(path.resolve())
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id, "notebook")}
    assert artifacts == {"notebook/experiment.ipynb"}
    assert first.data.tags["rlab.git.commit"] == first.data.tags["mlflow.source.git.commit"]
    assert first.data.tags["rlab.git.dirty"] == "true"
    # saved while the spanning run was open: the artifact is the last saved version
    logged = Path(client.download_artifacts(span.info.run_id, "notebook/experiment.ipynb", str(path.parent.parent)))
    assert logged.read_bytes() == path.read_bytes() and path.read_bytes().endswith(b"\n\n")

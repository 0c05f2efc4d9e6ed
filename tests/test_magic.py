"""The rlab magics in a real notebook executed headlessly by nbclient, in a real git repository, the way
Jupyter Server runs it (`JPY_SESSION_NAME` names the notebook file)."""

from __future__ import annotations

import os
import subprocess
import tempfile
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


def execute(tmp_path: Path, cells: list[str], uri: str | None = None, saved: nbformat.NotebookNode | None = None,
            raises: tuple[int, ...] = ()) -> tuple[nbformat.NotebookNode, str, Path, list[dict]]:
    """Execute a notebook of `cells` (after a first cell `uri = ...`) in a temp repo; return it, the store URI, the
    notebook file (`saved` when given: what JupyterLab last saved, else the notebook itself) and the replies."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    uri = uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f'uri = "{uri}"')] + [nbformat.v4.new_code_cell(c) for c in cells]
    for i in raises:
        nb.cells[i].metadata["tags"] = ["raises-exception"]
    path = repo / "experiment.ipynb"
    nbformat.write(saved if saved is not None else nb, path)  # untracked: it enters the git patch, logged as the notebook
    package_root = str(Path(researchlab.__file__).resolve().parents[1])  # the kernel imports this researchlab
    kernel_env = {**env, "JPY_SESSION_NAME": str(path), "JAX_PLATFORMS": "cpu",
                  "PYTHONPATH": os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    kernel_env.pop("MLFLOW_TRACKING_URI", None)
    kernel_env.pop("MLFLOW_LOGGING_LEVEL", None)
    replies: list[dict] = []
    client = NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(repo)}},
                            on_cell_executed=lambda cell, cell_index, execute_reply: replies.append(execute_reply))
    client.execute(env=kernel_env)
    return nb, uri, path, replies


@pytest.fixture
def notebook_run(tmp_path: Path) -> tuple[nbformat.NotebookNode, str, Path]:
    "Execute the notebook once in a temp repo with a sqlite store; return it, the store URI and its path."
    nb, uri, path, _ = execute(tmp_path, CELLS, raises=(3, 10))
    return nb, uri, path


def banner(run: object, uri: str, experiment: str, verb: str = "") -> str:
    "What the magics print when run `run` starts, with the link for a store at `uri`."
    exp, rid = run.info.experiment_id, run.info.run_id
    see = (f"{uri}/#/experiments/{exp}/runs/{rid}" if uri.startswith("http") else
           f"mlflow ui --backend-store-uri {uri} --port 5000, then open http://127.0.0.1:5000/#/experiments/{exp}/runs/{rid}")
    return (f"rlab: {verb}run {run.info.run_name!r} (MLflow run {rid}) in experiment {experiment!r} (id {exp})\n"
            f"  see it: {see}\n  mlflow.log_* and MLFlowTelemetry() with no arguments log to this run\n")


def download(client: MlflowClient, run: object, artifact: str) -> Path:
    return Path(client.download_artifacts(run.info.run_id, artifact, tempfile.mkdtemp()))


def executed(client: MlflowClient, run: object) -> list[tuple[int, str]]:
    "The (execution count, source) pairs of a run's executed-cells notebook, checked against nbformat's schema."
    nb = nbformat.read(download(client, run, "notebook/executed-cells.ipynb"), as_version=4)
    nbformat.validate(nb)
    return [(c.execution_count, c.source) for c in nb.cells]


def stderr_of(cell: nbformat.NotebookNode) -> str:
    "What a cell wrote to stderr alone (warnings, log lines)."
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")


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
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("magic-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert out[2] == banner(runs["2026-03-01_first-cell"], uri, "magic-test") + "42"
    assert out[3] == banner(runs["2026-03-01_bad-cell"], uri, "magic-test") + "ValueError: boom in cell"
    assert stderr_of(nb.cells[2]) == ""  # no red INFO lines from MLflow creating the store
    assert out[4] == "no active run\n"
    assert "started run '2026-03-01_span-cells'" in out[5]
    assert "'2026-03-01_span-cells'" in out[7] and "already active; nothing started" in out[7]
    assert "run '2026-03-01_span-cells' ended FINISHED" in out[8]
    assert "no run started with %rlab_start is active" in out[9]
    assert "UsageError" in text_of(nb.cells[10], "stderr") and "experiment" in text_of(nb.cells[10], "stderr")

    assert set(runs) == {"2026-03-01_first-cell", "2026-03-01_bad-cell", "2026-03-01_span-cells"}
    first, bad, span = runs["2026-03-01_first-cell"], runs["2026-03-01_bad-cell"], runs["2026-03-01_span-cells"]
    assert (first.info.status, bad.info.status, span.info.status) == ("FINISHED", "FAILED", "FINISHED")
    assert first.data.params == {"seed": "4"} and first.data.metrics == {"x": 1.0}
    assert span.data.metrics == {"y": 2.0}
    # the notebook file is logged, and the git state recorded although MLflow records none under Jupyter
    assert first.data.tags["rlab.notebook"] == str(path.resolve())
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id, "notebook")}
    assert artifacts == {"notebook/experiment.ipynb", "notebook/executed-cells.ipynb", "notebook/executed-cells.py"}
    # what the kernel executed up to and including the tracked cell, in order, as typed
    assert executed(client, first) == [(1, nb.cells[0].source), (2, CELLS[0]), (3, CELLS[1])]
    # a run spanning cells: logged again when it ends, through the %rlab_stop that ended it
    assert executed(client, span) == [(1, nb.cells[0].source)] + [(i + 2, c) for i, c in enumerate(CELLS[:8])]
    script = download(client, span, "notebook/executed-cells.py").read_text()
    assert script.index("# %% In[6]\n%rlab_start magic-test --uri $uri --name 2026-03-01_span-cells\n") \
        < script.index("# %% In[9]\n%rlab_stop\n")
    assert {a.path for a in client.list_artifacts(first.info.run_id)} >= {"git.patch.txt"}
    assert first.data.tags["rlab.git.commit"] == first.data.tags["mlflow.source.git.commit"]
    assert first.data.tags["rlab.git.dirty"] == "true"
    # saved while the spanning run was open: the artifact is the last saved version
    logged = Path(client.download_artifacts(span.info.run_id, "notebook/experiment.ipynb", str(path.parent.parent)))
    assert logged.read_bytes() == path.read_bytes() and path.read_bytes().endswith(b"\n\n")


FRESH = [
    "%load_ext researchlab\nfrom researchlab import Config\n"
    "class Train(Config):\n    seed: int = 0\nclass Loop:\n    config = Train(seed=7)\nloop = Loop()",
    # 2: a fresh notebook: JupyterLab has saved no cell yet; the config is an attribute of a variable
    "%%rlab_run fresh --uri $uri --name 2026-03-02_fresh --config loop.config\nimport logging\n"
    "print(logging.getLogger('mlflow').getEffectiveLevel())  # MLflow's INFO lines are quiet in the run\nloop.config.seed",
    # 3: a --config that names nothing: refused before any run
    "%%rlab_run fresh --uri $uri --name 2026-03-02_refused --config loop.missing\n1",
    # 4, 5: the usage, as for any magic; the line form explains itself
    "%rlab_run?",
    "%rlab_run fresh",
    # 6: MLflow's INFO lines are shown when asked for
    "%%rlab_run fresh --uri $uri --name 2026-03-02_loud --log-level INFO\nimport logging\n"
    "print(logging.getLogger('mlflow').getEffectiveLevel())",
    "import logging\nprint(logging.getLogger('mlflow').getEffectiveLevel())",
    # 8: a plain ExperimentTracker in a cell logs the executed cells too
    "from researchlab import ExperimentTracker\nwith ExperimentTracker('fresh', '2026-03-02_plain', uri):\n    pass",
]


def test_fresh_notebook_server_link_config_attribute_and_help(tmp_path: Path, mlflow_server) -> None:
    "A never-saved notebook on a real MLflow server: warned, cells logged, link printed, bad --config refused."
    empty = nbformat.v4.new_notebook()  # what a fresh JupyterLab notebook is on disk: 72 bytes, no cells
    nb, uri, path, replies = execute(tmp_path, FRESH, uri=mlflow_server.uri, saved=empty, raises=(3,))
    assert path.stat().st_size < 100
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fresh")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"2026-03-02_fresh", "2026-03-02_loud", "2026-03-02_plain"}  # the refused one: none
    fresh = runs["2026-03-02_fresh"]
    assert text_of(nb.cells[2]) == banner(fresh, uri, "fresh") + "30\n7"
    assert f"{uri}/#/experiments/{exp.experiment_id}/runs/{fresh.info.run_id}" in text_of(nb.cells[2])
    warned = stderr_of(nb.cells[2])
    assert "NotebookNotSavedWarning" in warned and f"the saved notebook {path} has no cells" in warned
    assert "executed-cells.ipynb" in warned and "Ctrl+S" in warned
    assert fresh.data.params == {"seed": "7"}
    assert executed(client, fresh) == [(1, nb.cells[0].source), (2, FRESH[0]), (3, FRESH[1])]
    error = text_of(nb.cells[3], "stderr") + text_of(nb.cells[3])
    assert "--config loop.missing: loop (Loop) has no attribute or key 'missing'" in error and "No run was started" in error
    help_text = "".join(p["data"]["text/plain"] for p in replies[4]["content"]["payload"] if p.get("source") == "page")
    assert "%rlab_run [--name NAME]" in help_text and "--config CONFIG" in help_text and "tracked MLflow run" in help_text
    assert "is a cell magic" in text_of(nb.cells[5])
    assert text_of(nb.cells[6]) == banner(runs["2026-03-02_loud"], uri, "fresh") + "20\n"  # INFO when asked for
    assert text_of(nb.cells[7]) == "20\n"  # and MLflow's own level once the runs ended
    assert executed(client, runs["2026-03-02_plain"]) == [(1, nb.cells[0].source)] + [
        (i + 2, c) for i, c in enumerate(FRESH)]

"""What the end-to-end tests of `rlab` share: a user's project (a git repository with a commit and an uncommitted
change), `rlab ARGS` in a fresh interpreter there, and the artifacts of an MLflow run."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def rlab_env() -> dict[str, str]:
    "The environment of an `rlab` child process: CPU, this checkout (and the tests' builders) importable, no "
    "tracking URI inherited from the caller."
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", MPLBACKEND="Agg")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def rlab(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    "`rlab ARGS` in a fresh interpreter in `cwd`."
    return subprocess.run([sys.executable, "-m", "researchlab.cli", *args], cwd=cwd, env=rlab_env(), text=True,
                          capture_output=True, timeout=timeout)


def make_project(path: Path) -> Path:
    "A git repository with one commit and an uncommitted change, as a user's project would be."
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    (path / ".gitignore").write_text("mlflow.db\nruns/\nmlflow-spool/\n")
    (path / "train.py").write_text("print('hello')\n")
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], cwd=path, check=True)
    (path / "train.py").write_text("print('hello, changed')\n")
    return path


def artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    "Every artifact file of the run, recursively."
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(artifacts(client, run_id, f.path) if f.is_dir else [f.path])
    return out

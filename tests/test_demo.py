"""`rlab demo` end to end, in a fresh git repository: a short run leaves an MLflow run with params, metrics,
the git patch, the config and the video; Ctrl-C leaves a checkpoint that `--resume` continues."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _rlab(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "researchlab.cli", *args], cwd=cwd, env=_env(), text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    "A git repository with one commit and an uncommitted change, as a user's project would be."
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("mlflow.db\nruns/\nmlflow-spool/\n")
    (tmp_path / "train.py").write_text("print('hello')\n")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], cwd=tmp_path,
                   check=True)
    (tmp_path / "train.py").write_text("print('hello, changed')\n")
    return tmp_path


def _runs(cwd: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rlab-demo")
    assert exp is not None, "rlab demo created no 'rlab-demo' experiment"
    return client, client.search_runs([exp.experiment_id])


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, f.path) if f.is_dir else [f.path])
    return out


def test_demo_bad_arguments(project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from researchlab.cli import main

    monkeypatch.chdir(project)
    assert main(["demo", "total_step=10"]) == 2
    assert "unknown option 'total_step'" in capsys.readouterr().err
    assert main(["demo", "num_envs=-1"]) == 2
    assert "num_envs=-1" in capsys.readouterr().err
    for bad in ("lr=inf", "lr=nan", "lr=-inf"):
        assert main(["demo", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{bad}: Input should be a finite number" in err, err
    assert main(["demo", "total_steps=100"]) == 2  # valid alone, less than one PPO update once built
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "total_steps = 100 is less than one update" in err, err
    assert "Traceback" not in err
    assert main(["demo", "--resume", "no-such-run"]) == 2
    assert "no-such-run" in capsys.readouterr().err
    assert main(["demo", "--resume", "x", "total_steps=10"]) == 2
    assert "total_steps cannot change when resuming" in capsys.readouterr().err
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "total_steps=500000" in out and "--resume RUN_ID" in out
    assert main(["serve"]) == 2
    assert not (project / "runs").exists() and not (project / "mlflow.db").exists()


def test_demo_ctrl_c_then_resume_is_tracked(project: Path):
    "Ctrl-C leaves a checkpoint and a KILLED run; --resume finishes it: params, metrics, patch, config, video."
    proc = subprocess.Popen([sys.executable, "-m", "researchlab.cli", "demo", "seed=3", "save_every=5", "log_every=5"],
                            cwd=project, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list(project.glob("runs/*/checkpoints/ckpt_*.eqx")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err[-3000:])
    run_id = re.search(r"rlab demo --resume (\S+)", out).group(1)
    stopped_at = int(re.search(r"interrupted at update (\d+)", out).group(1))
    assert 5 <= stopped_at < 976
    assert (project / "runs" / run_id / "checkpoints" / f"ckpt_{stopped_at:010d}.eqx").is_file()
    client, runs = _runs(project)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"

    res = _rlab(project, "demo", "--resume", run_id)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert f"run id:       {run_id}" in out and "after 976 updates" in out, out
    assert re.search(r"final return:\s+[\d.]+", out), out
    video = re.search(r"video:\s+(\S+)", out).group(1)
    assert (project / video).stat().st_size > 1000
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    assert (project / "runs" / run_id / "checkpoints" / "ckpt_0000000976.eqx").is_file()

    client, runs = _runs(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["rlab.run_id"] == run_id
    assert run.data.params["seed"] == "3" and run.data.params["total_steps"] == "500000"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "env_steps")]
    assert steps == list(range(5, 976, 5))  # before and after the interruption, each update once
    assert "episode_return" in run.data.metrics and "eval_episode_length" in run.data.metrics
    arts = _artifacts(client, run.info.run_id)
    assert {"git.patch", "config.yaml", "videos/episode.mp4"} <= set(arts), arts
    patch = Path(client.download_artifacts(run.info.run_id, "git.patch", str(project / "dl"))).read_text()
    assert "hello, changed" in patch
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(project / "dl"))).read_text()
    assert "total_steps: 500000" in config

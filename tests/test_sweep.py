"""Sweeps (researchlab.tracking.sweep) against a real MLflow server: 6 trials as local `rlab run` processes and as
tasks of a local Ray cluster (2 workers) are child runs of the sweep's run with the right params; a sweep killed
after its first trials (SIGINT, then SIGKILL) resumes and runs only the unfinished ones; every bad input is a
one-line error before anything exists; `--population` packs PPO seeds into one program."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _sweep_toy import final_x
from mlflow import MlflowClient

from researchlab.tracking.sweep import SweepError, sweep

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TOY = "_sweep_toy:toy_experiment"
PPO = "researchlab.examples.demo:ppo_experiment"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    "Trials run from a temp folder (no git repo) and can import the toy builder."
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _children(uri: str, parent_id: str) -> list:
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    return list(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"))


def _check_trials(uri: str, res: dict, expected: list[tuple[float, int]]) -> None:
    "One FINISHED child per trial, its params and last metric those of the trial, tagged with the sweep."
    children = _children(uri, res["parent_run_id"])
    assert len(children) == len(expected), [c.data.tags.get("rlab.sweep.trial") for c in children]
    got = sorted((float(c.data.params["lr"]), int(c.data.params["seed"])) for c in children)
    assert got == sorted(expected)
    for c in children:
        assert c.info.status == "FINISHED"
        lr, seed = float(c.data.params["lr"]), int(c.data.params["seed"])
        assert c.data.tags["rlab.sweep.trial"] == f"lr={lr!r} seed={seed}"
        assert c.data.tags["rlab.sweep.id"] == res["sweep_id"] and c.data.tags["rlab.target"] == TOY
        assert np.isclose(c.data.metrics["x"], final_x(lr, seed), rtol=1e-5)
    parent = MlflowClient(uri).get_run(res["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["rlab.kind"] == "sweep"


def test_random_search_of_six_trials_as_local_processes(mlflow_server, in_tmp: Path):
    res = sweep(TOY, ["lr=loguniform(0.05,0.5)", "seed=0:2"], samples=3, seed=1, experiment="sweep-local",
                tracking_uri=mlflow_server.uri, runs_dir=in_tmp / "runs", max_parallel=2)
    assert (res["ran"], res["skipped"], res["status"]) == (6, 0, "FINISHED")
    expected = [(t["params"]["lr"], t["params"]["seed"]) for t in res["trials"]]
    assert len({lr for lr, _ in expected}) == 3 and all(0.05 <= lr <= 0.5 for lr, _ in expected)
    _check_trials(mlflow_server.uri, res, expected)
    parent = MlflowClient(mlflow_server.uri).get_run(res["parent_run_id"])
    assert parent.data.tags["rlab.sweep.grid"] == "lr=loguniform(0.05,0.5) seed=0,1"
    assert parent.data.tags["rlab.sweep.samples"] == "3"


def test_six_trials_on_a_local_ray_cluster(mlflow_server, in_tmp: Path):
    pytest.importorskip("ray", reason="Ray is the optional extra researchlab[sweep]")
    res = sweep(TOY, ["lr=0.1,0.2,0.3", "seed=0:2"], executor="ray", max_parallel=2, experiment="sweep-ray",
                tracking_uri=mlflow_server.uri, runs_dir=in_tmp / "runs")
    assert (res["ran"], res["status"]) == (6, "FINISHED")
    _check_trials(mlflow_server.uri, res, [(lr, s) for lr in (0.1, 0.2, 0.3) for s in (0, 1)])
    assert MlflowClient(mlflow_server.uri).get_run(res["parent_run_id"]).data.tags["rlab.sweep.executor"] == "ray"


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "researchlab.cli", "sweep", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))


def _until_finished(proc: subprocess.Popen, n: int) -> list[str]:
    "Read the sweep's output until `n` trials said they finished."
    lines = []
    deadline = time.monotonic() + 300
    while sum(": finished after" in line for line in lines) < n:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, "".join(lines)
        lines.append(line)
    return lines


def _trial_runs(uri: str, parent_id: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in _children(uri, parent_id):
        out.setdefault(c.data.tags["rlab.sweep.trial"], []).append(c)
    return out


def test_killed_sweep_resumes_only_the_unfinished_trials(mlflow_server, in_tmp: Path):
    uri, keys = mlflow_server.uri, [f"lr=0.2 seed={s}" for s in range(4)]
    common = ["--experiment", "sweep-kill", "--tracking-uri", uri, "--runs-dir", str(in_tmp / "runs"), "--parallel", "1"]
    proc = _start(in_tmp, TOY, "lr=0.2", "seed=0:4", *common)
    lines = _until_finished(proc, 1)
    head = next(line for line in lines if line.startswith("rlab sweep: ") and "(MLflow run " in line)
    sweep_id = head.split()[2]  # "rlab sweep: <id> (MLflow run <id>): 4 trials, ..."
    parent_id = head.split("(MLflow run ")[1].split(")")[0]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out
    assert f"continue with: rlab sweep --resume {sweep_id}" in out
    assert MlflowClient(uri).get_run(parent_id).info.status == "KILLED"
    first = _trial_runs(uri, parent_id)
    assert [r.info.status for r in first[keys[0]]] == ["FINISHED"]
    assert not any(r.info.status == "FINISHED" for k in keys[1:] for r in first.get(k, []))

    proc = _start(in_tmp, "--resume", sweep_id, "--tracking-uri", uri, "--runs-dir", str(in_tmp / "runs"),
                  "--parallel", "1")
    lines = _until_finished(proc, 1)
    assert any("4 trials, 1 finished already, running 3" in line for line in lines), lines
    proc.kill()  # SIGKILL: the running trial gets SIGTERM from the kernel (its parent-death signal)
    proc.wait()
    second = _trial_runs(uri, parent_id)
    done = [k for k in keys if any(r.info.status == "FINISHED" for r in second.get(k, []))]
    assert len(done) == 2 and done[0] == keys[0], done
    deadline = time.monotonic() + 120  # the orphaned trial, if any, ends on its SIGTERM
    while any(r.info.status == "RUNNING" for runs in _trial_runs(uri, parent_id).values() for r in runs) \
            and time.monotonic() < deadline:
        time.sleep(0.5)

    res = subprocess.run([sys.executable, "-m", "researchlab.cli", "sweep", "--resume", sweep_id, "--tracking-uri",
                          uri, "--runs-dir", str(in_tmp / "runs")], cwd=in_tmp, text=True, capture_output=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 trials, 2 finished already, running 2" in res.stdout, res.stdout
    final = _trial_runs(uri, parent_id)
    for k in keys:
        assert sum(r.info.status == "FINISHED" for r in final[k]) == 1, (k, [r.info.status for r in final[k]])
    for k in done:  # the trials that had finished were not run again
        assert [r.info.run_id for r in final[k] if r.info.status == "FINISHED"] == \
               [r.info.run_id for r in second[k] if r.info.status == "FINISHED"]
    assert MlflowClient(uri).get_run(parent_id).info.status == "FINISHED"


@pytest.mark.parametrize("grid, message", [
    (["lrr=1e-3"], "unknown key 'lrr' in the grid"),
    (["seed=3:3"], "seed=3:3: the range is empty"),
    (["lr=1e-3,-2"], "trial lr=-2"),
    (["total_steps=100"], "less than one update"),  # valid alone, refused by the builder's PPOConfig
    (["lr=loguniform(1e-5,1e-3)"], "needs a budget; give --samples N"),
])
def test_bad_grids_are_refused_before_anything_starts(sqlite_uri: str, in_tmp: Path, grid: list, message: str):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep(PPO, grid, tracking_uri=sqlite_uri, runs_dir=in_tmp / "runs")
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "runs").exists()


@pytest.mark.parametrize("target, message", [
    ("researchlab.examples.ppo:init_ppo", "is not a builder"),
    ("researchlab.examples.ppo", "is not package.module:function"),
    ("researchlab.examples.nosuch:f", "no module named 'researchlab.examples.nosuch'"),
])
def test_a_target_that_is_not_a_builder_is_refused(sqlite_uri: str, in_tmp: Path, target: str, message: str):
    with pytest.raises(SweepError, match=message):
        sweep(target, ["seed=0:2"], tracking_uri=sqlite_uri, runs_dir=in_tmp / "runs")
    assert not (in_tmp / "mlflow.db").exists()


def test_rlab_sweep_bad_command_line_is_one_line_and_exit_2(in_tmp: Path):
    res = subprocess.run([sys.executable, "-m", "researchlab.cli", "sweep", PPO, "seed=0:2", "lrr=1,2"], cwd=in_tmp,
                         text=True, capture_output=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0 and "unknown key 'lrr' in the grid" in res.stderr, res.stderr
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "runs").exists()


def test_population_packs_ppo_seeds_into_one_program(sqlite_uri: str, in_tmp: Path):
    small = {"total_steps": 2048, "num_envs": 4, "video": False, "log_every": 1}
    res = sweep(PPO, {"lr": [2.5e-4, 1e-3], "seed": [0, 1], **{k: [v] for k, v in small.items()}}, population=True,
                experiment="sweep-pop", tracking_uri=sqlite_uri, runs_dir=in_tmp / "runs")
    assert res["status"] == "FINISHED" and res["ran"] == 4
    children = _children(sqlite_uri, res["parent_run_id"])
    assert len(children) == 4 and {c.data.tags["rlab.sweep.population"] for c in children} == {"0"}
    assert sorted((float(c.data.params["lr"]), int(c.data.params["seed"])) for c in children) == \
           [(2.5e-4, 0), (2.5e-4, 1), (1e-3, 0), (1e-3, 1)]
    assert all(c.info.status == "FINISHED" and "episode_return" in c.data.metrics for c in children)


def test_resume_of_an_unknown_sweep_creates_nothing(sqlite_uri: str, in_tmp: Path):
    with pytest.raises(SweepError, match="no MLflow store at"):
        sweep(None, resume="2026-12-02_no-such-sweep", tracking_uri=sqlite_uri)
    assert not (in_tmp / "mlflow.db").exists()
    with pytest.raises(SweepError, match="no TARGET|no target"):
        sweep(None, ["seed=0:2"], tracking_uri=sqlite_uri)

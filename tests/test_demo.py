"""`rlab demo` end to end, in a fresh git repository: a short run leaves an MLflow run with params, metrics,
the git patch, the config and the video; Ctrl-C leaves a checkpoint that `--resume` continues."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from _projects import artifacts, make_project, rlab, rlab_env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    "A git repository with one commit and an uncommitted change, as a user's project would be."
    return make_project(tmp_path)


def _runs(cwd: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rlab-demo")
    assert exp is not None, "rlab demo created no 'rlab-demo' experiment"
    return client, client.search_runs([exp.experiment_id])




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
                            cwd=project, env=rlab_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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

    res = rlab(project, "demo", "--resume", run_id)
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
    arts = artifacts(client, run.info.run_id)
    assert {"git.patch.txt", "config.yaml", "videos/episode.mp4"} <= set(arts), arts
    patch = Path(client.download_artifacts(run.info.run_id, "git.patch.txt", str(project / "dl"))).read_text()
    assert "hello, changed" in patch
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(project / "dl"))).read_text()
    assert "total_steps: 500000" in config


def _interrupt_after_first_checkpoint(cwd: Path, *args: str) -> tuple[str, str, int]:
    "Start `rlab demo ARGS` in `cwd`, Ctrl-C it once its first checkpoint is on disk; `(stdout, stderr, returncode)`."
    proc = subprocess.Popen([sys.executable, "-m", "researchlab.cli", "demo", *args], cwd=cwd, env=rlab_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list(cwd.glob("runs/*/checkpoints/ckpt_*.eqx")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return out, err, proc.returncode


def test_demo_resumes_on_a_fresh_folder_from_mlflow_alone(tmp_path: Path, mlflow_server):
    """Ctrl-C on machine A; --resume in a fresh folder B (no runs/, another git repo) from the MLflow server's logged
    config and checkpoint; every metric point and the final State equal an uninterrupted run's, bit for bit."""
    import equinox as eqx
    import jax
    import numpy as np

    from researchlab.design.infra import EquinoxPersister
    from researchlab.examples.ppo import PPOConfig, init_ppo, ppo_loop

    uri = mlflow_server.uri
    a, b = make_project(tmp_path / "machine-a"), make_project(tmp_path / "machine-b")
    out, err, rc = _interrupt_after_first_checkpoint(a, "seed=3", "save_every=5", "log_every=5", "video=false",
                                                     f"tracking_uri={uri}")
    assert rc == 130, (out[-2000:], err[-3000:])
    run_id = re.search(r"continue with: rlab demo --resume (\S+) tracking_uri=(\S+)", out).group(1)
    stopped_at = int(re.search(r"interrupted at update (\d+)", out).group(1))
    assert stopped_at % 5 == 0 and 5 <= stopped_at < 976, out  # calls of 5 updates: stops on a multiple of 5
    assert "on any machine: its checkpoint is logged to the MLflow run" in out, out
    client = mlflow.MlflowClient(uri)
    run = client.get_run(re.search(r"\(MLflow run (\w+)\)", out).group(1))
    link = f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert f"rlab demo: run {run_id} (MLflow run {run.info.run_id}); see it with: {link}" in out, out
    assert run.info.status == "KILLED" and run.data.tags["rlab.run_id"] == run_id
    assert run.data.tags["rlab.resume_command"] == f"rlab demo --resume {run_id} tracking_uri={uri}"
    assert run.data.tags["rlab.checkpoint_step"] == str(stopped_at)

    res = rlab(b, "demo", "--resume", run_id, f"tracking_uri={uri}")
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert (f"holds no local checkpoint; continuing from the checkpoint of update {stopped_at} logged to the MLflow "
            f"run") in res.stdout, res.stdout
    assert f"run id:       {run_id}" in res.stdout and "after 976 updates" in res.stdout, res.stdout
    assert f"browse it:    {link}" in res.stdout, res.stdout
    assert not list(a.glob("runs/*/checkpoints/ckpt_0000000976.eqx"))  # A's folder was not used
    final = b / "runs" / run_id / "checkpoints" / "ckpt_0000000976.eqx"
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "rlab.resume_command" not in run.data.tags, run.data.tags

    config = PPOConfig(seed=3)  # the same run straight through, in this process
    straight = ppo_loop(config, log_every=5, steps_per_call=5, progress=False)
    straight.run(config.num_updates)
    for name in straight.history[-1]:
        if name == "step":
            continue
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(logged) == [(r["step"], r[name]) for r in straight.history], name
    state, _, step = EquinoxPersister().load(final, init_ppo(config), PPOConfig)
    assert step == 976
    for x, y in zip(jax.tree.leaves(eqx.filter(state, eqx.is_array)), jax.tree.leaves(eqx.filter(straight.state, eqx.is_array))):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_demo_resume_of_a_finished_run(project: Path):
    "A finished run: --resume says so in one line and touches nothing; only a larger total_steps continues it."
    res = rlab(project, "demo", "total_steps=2048", "log_every=1", "save_every=2", "video=false")  # 4 updates
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = re.search(r"run id:\s+(\S+)", res.stdout).group(1)
    client, (run,) = _runs(project)
    before = sorted(artifacts(client, run.info.run_id))
    assert "rlab.resume_command" not in run.data.tags  # finished: nothing to resume

    res = rlab(project, "demo", "--resume", run_id)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == (f"rlab demo: run {run_id} is finished (4 updates, total_steps=2048); nothing to resume. To "
                          f"train it longer: rlab demo --resume {run_id} total_steps=N with N >= 2560\n"), res.stdout
    client, (run,) = _runs(project)
    assert run.info.status == "FINISHED" and sorted(artifacts(client, run.info.run_id)) == before
    assert "rlab.resumed_at" not in run.data.tags

    for bad, says in (("total_steps=2048", "total_steps=2048 (4 updates) does not extend run"),
                      ("total_steps=100", "invalid options: total_steps = 100 is less than one update")):
        res = rlab(project, "demo", "--resume", run_id, bad)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and says in res.stderr, res.stderr
        assert "Traceback" not in res.stderr

    res = rlab(project, "demo", "--resume", run_id, "total_steps=4096")  # 8 updates: 4 more
    assert res.returncode == 0, res.stderr[-3000:]
    assert "after 8 updates" in res.stdout, res.stdout
    client, (run,) = _runs(project)
    assert run.info.status == "FINISHED" and run.data.tags["rlab.extended"] == "total_steps 2048 -> 4096"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "env_steps")] == list(range(1, 9))
    assert (project / "runs" / run_id / "checkpoints" / "ckpt_0000000008.eqx").is_file()
    assert '"total_steps": 4096' in (project / "runs" / run_id / "config.json").read_text()


def test_demo_ctrl_c_messages_agree(project: Path):
    "What Ctrl-C announces ('stopping at step N') is where the run stops ('stopped at step N', 'update N')."
    out, err, rc = _interrupt_after_first_checkpoint(project, "save_every=5", "video=false")
    assert rc == 130, (out[-2000:], err[-3000:])
    stopped = int(re.search(r"interrupted at update (\d+)", out).group(1))
    assert f"stopped at step {stopped}" in out, out
    announced = re.search(r"stopping at step (\d+)", out)
    assert announced is not None and int(announced.group(1)) == stopped, out

"""Forks: `rlab run TARGET --fork RUN_ID@STEP key=value` and `loop.fork(step, **changes)` restore the State from a
checkpoint at or before STEP; with nothing changed the child continues the parent bit for bit (CPU)."""

import json
from pathlib import Path

import mlflow
import pytest
from _projects import make_project, rlab
from test_run import QUAD, finished_run

from researchlab.tracking.fork import FORK_TAGS


def _history(client: mlflow.MlflowClient, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> dict:
    "A finished quadratic run of 8 steps, checkpoints every 2 (the last 3 kept: 4, 6, 8), in a project folder."
    project = make_project(tmp_path_factory.mktemp("fork") / "project")
    res = rlab(project, "run", QUAD, "steps=8", "lr=0.2", "--run-name", "parent-run", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return {"project": project, "uri": uri, "mlflow_id": finished_run(res.stdout), "client": mlflow.MlflowClient(uri)}


def test_fork_with_nothing_changed_continues_bit_for_bit(parent: dict):
    "Fork at step 5: restored from the checkpoint of step 4; the child's first step is 5, its metrics the parent's."
    project, client = parent["project"], parent["client"]
    res = rlab(project, "run", QUAD, "--fork", "parent-run@5", "--run-name", "child-same", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "forked from run parent-run at step 4" in res.stdout, res.stdout
    child = client.get_run(finished_run(res.stdout))
    tags = child.data.tags
    assert tags[FORK_TAGS["parent"]] == "parent-run" and tags[FORK_TAGS["parent_mlflow_run_id"]] == parent["mlflow_id"]
    assert tags[FORK_TAGS["step"]] == "4" and json.loads(tags[FORK_TAGS["changes"]]) == {}
    assert child.info.run_id != parent["mlflow_id"] and tags["rlab.run_id"] == "child-same"
    for name in ("loss", "w0"):
        mine, theirs = _history(client, child.info.run_id, name), _history(client, parent["mlflow_id"], name)
        assert mine[0][0] == 5 and mine == [p for p in theirs if p[0] > 4], name  # bit for bit: same floats
    assert (project / "runs" / "child-same" / "checkpoints" / "ckpt_0000000008.eqx").is_file()
    assert (project / "runs" / "parent-run" / "checkpoints" / "ckpt_0000000008.eqx").is_file()  # parent untouched


def test_fork_with_a_change_is_tagged_and_differs(parent: dict):
    project, client = parent["project"], parent["client"]
    res = rlab(project, "run", QUAD, "--fork", "parent-run@6", "lr=0.05", "steps=10", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    child = client.get_run(finished_run(res.stdout))
    assert json.loads(child.data.tags[FORK_TAGS["changes"]]) == {"lr": 0.05, "steps": 10}
    assert json.loads(child.data.tags["rlab.overrides"]) == {"lr": 0.05, "steps": 10}
    assert child.data.params["lr"] == "0.05" and child.data.tags[FORK_TAGS["step"]] == "6"
    mine = _history(client, child.info.run_id, "loss")
    assert [s for s, _ in mine] == [7, 8, 9, 10]
    assert mine[:2] != [p for p in _history(client, parent["mlflow_id"], "loss") if p[0] > 6]


def test_fork_refusals_name_the_problem_and_create_nothing(parent: dict, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture):
    "No checkpoint at or before STEP lists the steps with one; a change of the State's shapes names the option."
    from researchlab.cli import main

    project, client = parent["project"], parent["client"]
    monkeypatch.chdir(project)
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    folders = sorted(p.name for p in (project / "runs").iterdir())
    for args, says in ((["parent-run@1"], "run parent-run has no checkpoint at or before step 1; the steps with one: "
                                         "4, 6, 8 (runs/parent-run/checkpoints) and 2, 8 (logged to its MLflow run)"),
                       (["parent-run@8", "size=5"], "size=5 changes the State's structure (leaf .w: float32[3] -> "
                                                   "float32[5])"),
                       (["parent-run@8", "sz=5"], "unknown option 'sz'"),
                       (["parent-run@8", "lr=0"], "lr=0: Input should be greater than 0")):
        assert main(["run", QUAD, "--fork", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before
    assert sorted(p.name for p in (project / "runs").iterdir()) == folders


def test_fork_from_mlflow_alone(parent: dict, tmp_path: Path):
    "In a fresh folder (no runs/) the fork restores the checkpoint logged to the MLflow run at or before STEP."
    elsewhere = make_project(tmp_path / "elsewhere")
    res = rlab(elsewhere, "run", QUAD, "--fork", "parent-run@7", "--tracking-uri", parent["uri"], "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    client = parent["client"]
    child = client.get_run(finished_run(res.stdout))
    step = int(child.data.tags[FORK_TAGS["step"]])  # the logged slots hold the first save (2) and the last (8)
    assert step == 2 and "of MLflow run" in res.stdout, res.stdout
    assert _history(client, child.info.run_id, "loss") == [p for p in _history(client, parent["mlflow_id"], "loss")
                                                           if p[0] > step]


def test_loop_fork_in_python_with_mlflow(tmp_path: Path):
    "`loop.fork` on a PPO Loop logging to MLflow: a child run with lineage tags, metrics equal to the parent's."
    from researchlab.design.infra import MLFlowTelemetry
    from researchlab.examples.ppo import PPOConfig, ppo_loop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("loops", artifact_location=str(tmp_path / "artifacts"))
    parent_run = client.create_run(exp_id, tags={"rlab.run_id": "ppo-parent"}).info.run_id
    tiny = PPOConfig(num_envs=2, num_steps=16, total_steps=2 * 16 * 6, update_epochs=1, num_minibatches=2, hidden=16)
    loop = ppo_loop(tiny, log_every=1, save_every=2, checkpoint_dir=tmp_path / "ckpt", progress=False,
                    telemetry=MLFlowTelemetry(run_id=parent_run, tracking_uri=uri))
    loop.run(6)
    loop.close()
    child = loop.fork(step=5)
    assert child.step_count == 4 and child.config == tiny
    child.run(2)
    child.close()
    assert child.history == [r for r in loop.history if r["step"] > 4]
    run = client.get_run(child.telemetry.run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == exp_id
    tags = run.data.tags
    assert (tags[FORK_TAGS["parent"]], tags[FORK_TAGS["parent_mlflow_run_id"]], tags[FORK_TAGS["step"]]) == (
        "ppo-parent", parent_run, "4")
    assert _history(client, run.info.run_id, "loss") == [p for p in _history(client, parent_run, "loss") if p[0] > 4]
    with pytest.raises(ValueError, match="changing num_envs=4 alters the State's structure"):
        loop.fork(6, num_envs=4)
    with pytest.raises(ValueError, match=r"no checkpoint at or before step 1 in .*; the steps with one: 2, 4, 6"):
        loop.fork(1)
    lower = loop.fork(4, telemetry=None, lr=1e-3)
    assert lower.config.lr == 1e-3 and lower.step_count == 4
    lower.close()

"""`rlab run TARGET`: any builder, tracked per the run contract (tags, cli/config/environment artifacts, git state),
with every bad input refused in one line, exit 2, before anything is created."""

import json
from pathlib import Path

import mlflow
import pytest
from _projects import artifacts, make_project, rlab

QUAD = "run_builders:quadratic"
PPO = "researchlab.examples.demo:ppo_experiment"
ENV_KEYS = {"python", "platform", "jax_backend", "jax_devices", "versions"}
PACKAGES = {"researchlab", "jax", "jaxlib", "equinox", "optax", "gymnax", "mlflow", "numpy"}








@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")




def read_artifact(client: mlflow.MlflowClient, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text()


def finished_run(stdout: str) -> str:
    "The MLflow run id on the contract's last line, `rlab run: finished <id> (MLflow run <mlflow id>)`."
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("rlab run: finished ") and last.endswith(")"), stdout[-2000:]
    return last.rsplit("(MLflow run ", 1)[1][:-1]


def test_run_a_builder_from_a_test_module(project: Path, tmp_path: Path):
    "TARGET is generic: a builder outside researchlab runs, tracked per the contract, and resumes as finished."
    parent = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    parent_id = parent.create_run(parent.create_experiment("sweeps")).info.run_id
    res = rlab(project, "run", QUAD, "steps=6", "lr=0.25", "--tag", "team=rl", "--parent-run-id", parent_id,
               "--run-name", "quad-1", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    mlflow_id = finished_run(res.stdout)
    assert "final loss:" in res.stdout and "run id:       quad-1" in res.stdout, res.stdout
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(mlflow_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["rlab.run_id"] == "quad-1"
    assert client.get_experiment(run.info.experiment_id).name == "quad"  # the Experiment's default
    assert tags["rlab.target"] == QUAD and json.loads(tags["rlab.overrides"]) == {"steps": 6, "lr": 0.25}
    assert tags["rlab.command"] == (f"rlab run {QUAD} steps=6 lr=0.25 --tag team=rl --parent-run-id {parent_id} "
                                    f"--run-name quad-1 --no-progress")
    assert tags["mlflow.parentRunId"] == parent_id and tags["team"] == "rl"
    assert tags["rlab.env.python"] and tags["rlab.env.jax"] and "(cpu)" in tags["rlab.env.platform"]
    assert tags["rlab.git.dirty"] == "true"
    assert {"git.patch.txt", "rlab/cli.json", "rlab/config.json", "rlab/environment.json"} <= set(
        artifacts(client, mlflow_id)), artifacts(client, mlflow_id)
    cli = json.loads(read_artifact(client, mlflow_id, "rlab/cli.json", tmp_path / "dl"))
    assert cli == {"steps": 6, "lr": 0.25, "size": 3, "seed": 0, "save_every": 2}  # every field
    env = json.loads(read_artifact(client, mlflow_id, "rlab/environment.json", tmp_path / "dl"))
    assert ENV_KEYS <= set(env) and PACKAGES <= set(env["versions"]) and env["jax_backend"] == "cpu"
    assert [m.step for m in client.get_metric_history(mlflow_id, "loss")] == list(range(1, 7))
    assert "hello, changed" in read_artifact(client, mlflow_id, "git.patch.txt", tmp_path / "dl")

    res = rlab(project, "run", QUAD, "--resume", "quad-1")
    assert res.returncode == 0 and res.stdout == "rlab run: run quad-1 is finished (6 steps); nothing to resume.\n", \
        (res.stdout, res.stderr[-2000:])


def test_run_target_in_python_and_help(project: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture):
    "`run_target` returns the contract's keys; `rlab run --help` and `rlab run TARGET --help` list flags and options."
    from researchlab.cli import main
    from researchlab.tracking.run import run_target

    monkeypatch.chdir(project)
    res = run_target(QUAD, ["steps=3"], experiment="py", tracking_uri=f"sqlite:///{project / 'py.db'}",
                     runs_dir=project / "out", tags={"k": "v"})
    assert {"run_id", "mlflow_run_id", "step", "interrupted"} <= set(res)
    assert res["step"] == 3 and res["interrupted"] is False
    run = mlflow.MlflowClient(f"sqlite:///{project / 'py.db'}").get_run(res["mlflow_run_id"])
    assert run.data.tags["rlab.command"] == (f"rlab run {QUAD} steps=3 --experiment py --tracking-uri "
                                             f"sqlite:///{project / 'py.db'} --runs-dir {project / 'out'} --tag k=v")
    assert (project / "out" / res["run_id"] / "checkpoints" / "ckpt_0000000003.eqx").is_file()
    capsys.readouterr()
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: rlab run TARGET" in out and "--fork RUN_ID@STEP" in out and "--parent-run-id" in out
    assert main(["run", QUAD, "--help"]) == 0
    out = capsys.readouterr().out
    assert "lr=0.1" in out and "gradient step size" in out and "steps=8" in out and "A noisy quadratic" in out, out


BAD = [((QUAD, "step=3"), "unknown option 'step' in 'step=3'; options are: steps, lr"),
       ((QUAD, "lr=-1"), "lr=-1: Input should be greater than 0"),
       ((QUAD, "lr=fast"), "lr='fast'"),
       ((QUAD, "steps"), "'steps' is not key=value"),
       (("no_such_module:build",), "no module named 'no_such_module'"),
       (("run_builders:missing",), "module run_builders has no attribute 'missing'; its builders are: quadratic"),
       (("run_builders:NOT_CALLABLE",), "is not a builder: NOT_CALLABLE is a int"),
       (("json:dumps",), "is not a builder: its first parameter 'obj' is not annotated with a researchlab Config"),
       (("run_builders:not_an_experiment",), "is not a builder: it returned a int"),
       (("run_builders",), "is not package.module:function"),
       ((PPO, "total_steps=100"), "total_steps = 100 is less than one update"),
       ((QUAD, "--fork", "nope"), "--fork needs RUN_ID@STEP"),
       ((QUAD, "--fork", "gone@3"), "has no run with rlab.run_id gone"),
       ((QUAD, "--resume", "gone"), "--resume gone: no run there"),
       ((QUAD, "--resume", "a", "--fork", "a@1"), "--resume and --fork exclude each other"),
       ((QUAD, "--bogus"), "unknown flag '--bogus'"),
       ((QUAD, "--tag", "novalue"), "--tag needs KEY=VALUE"),
       ((QUAD, "--resume"), "--resume needs a value"),
       ((), "no TARGET")]


@pytest.mark.parametrize("args,says", BAD, ids=[" ".join(a) or "empty" for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_created(args: tuple[str, ...], says: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from researchlab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlab run: ") and says in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlflow.db, no runs/


def test_run_the_ppo_builder(project: Path, tmp_path: Path):
    "The PPO builder through `rlab run`: two updates, params, env tags, the environment artifact."
    res = rlab(project, "run", PPO, "total_steps=1024", "save_every=1", "log_every=1", "video=false",
               "--experiment", "ppo", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    mlflow_id = finished_run(res.stdout)
    assert "after 2 updates" in res.stdout, res.stdout
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(mlflow_id)
    assert run.data.tags["rlab.target"] == PPO and run.data.params["total_steps"] == "1024"
    assert json.loads(run.data.tags["rlab.overrides"]) == {"total_steps": 1024, "save_every": 1, "log_every": 1,
                                                          "video": False}
    assert [m.step for m in client.get_metric_history(mlflow_id, "env_steps")] == [1, 2]
    config = json.loads(read_artifact(client, mlflow_id, "rlab/config.json", tmp_path / "dl"))
    assert config["total_steps"] == 1024 and config["num_envs"] == 4
    env = json.loads(read_artifact(client, mlflow_id, "rlab/environment.json", tmp_path / "dl"))
    assert PACKAGES <= set(env["versions"]) and env["versions"]["gymnax"]


def test_the_default_store_follows_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two runs with the default `sqlite:///mlflow.db`, a chdir between them (a notebook's `%cd`): each lands in its own
    folder's store, although MLflow keeps one engine per URI string."""
    from researchlab.tracking.run import run_target

    a, b = make_project(tmp_path / "a"), make_project(tmp_path / "b")
    ids = {}
    for folder in (a, b):
        monkeypatch.chdir(folder)
        ids[folder] = run_target(QUAD, ["steps=2"], experiment="here")["mlflow_run_id"]
    for folder in (a, b):
        client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("here").experiment_id])
        assert run.info.run_id == ids[folder]

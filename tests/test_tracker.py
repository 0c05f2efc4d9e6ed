"""`ExperimentTracker` against a real `mlflow server` on 127.0.0.1 and against sqlite, in real git repositories."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from researchlab.design.core import Config
from researchlab.tracking.tracker import ExperimentTracker, resolve_tracking_uri
from researchlab.tracking.utils import (
    _ADJECTIVES,
    _ANIMALS,
    GitStateWarning,
    find_run_by_rlab_id,
    generate_run_id,
    get_git_state,
    patch_bytes,
)


@pytest.fixture(autouse=True)
def clean_mlflow(monkeypatch: pytest.MonkeyPatch, isolated_git: None) -> Iterator[None]:
    "Git identity via env vars (conftest); no MLflow run or tracking URI leaks from one test into the next."
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored by monkeypatch after the test
    mlflow.set_tracking_uri(None)
    yield
    leaked = mlflow.active_run()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    assert leaked is None, f"a run was left active: {leaked.info.run_id}"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    "A sqlite store with MLflow's tables created once (the migrations take seconds); tests get copies."
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def sqlite_uri(empty_store: Path, tmp_path: Path) -> str:
    "A fresh sqlite store of this test's own (a copy of the empty one)."
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(params=["server", "sqlite"])
def uri(request: pytest.FixtureRequest) -> str:
    "The tracking URI of a real MLflow server on 127.0.0.1, or of a sqlite file."
    return request.getfixturevalue("mlflow_server").uri if request.param == "server" else request.getfixturevalue("sqlite_uri")


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    r = subprocess.run(["git", *args], cwd=repo, input=input, capture_output=True)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr.decode()}"
    return r.stdout.decode()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    "A repository with one commit, an edited file, a new binary file and an ignored secret."
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("lr = 1e-3\n")
    (repo / ".gitignore").write_text(".env\nmlflow.db\nmlruns/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    (repo / "train.py").write_text("lr = 3e-4\n")
    (repo / "weights.bin").write_bytes(os.urandom(512))
    (repo / ".env").write_text("TOKEN=hunter2\n")
    return repo


def experiment_runs(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else list(client.search_runs([exp.experiment_id]))


# ---- a run from start to end ------------------------------------------------------------------------------

def test_run_records_git_state_config_and_ends_finished(uri: str, repo: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("seed: 3\noptim:\n  lr: 0.0003\n  betas: [0.9, 0.999]\n")
    with ExperimentTracker("cartpole", tracking_uri=uri, repo_path=repo) as tracker:
        assert mlflow.active_run().info.run_id == tracker.active_run.info.run_id
        tracker.log_config(cfg)
        mlflow.log_metric("return", 10.0, step=0)
    assert tracker.active_run is None and tracker.status == "FINISHED"
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tracker.run_name
    assert re.fullmatch(rf"{date.today().isoformat()}_[a-z]+-[a-z]+", tracker.run_name)
    tags = run.data.tags
    head = git(repo, "rev-parse", "HEAD").strip()
    assert tags["rlab.run_id"] == tracker.run_name
    assert tags["rlab.git.commit"] == tags["mlflow.source.git.commit"] == head
    assert (tags["rlab.git.branch"], tags["rlab.git.dirty"]) == ("main", "true")
    assert run.data.params == {"seed": "3", "optim.lr": "0.0003", "optim.betas": "[0.9, 0.999]"}
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id)) == ["git.patch.txt", "train.yaml"]
    assert find_run_by_rlab_id(tracker.run_name, client).info.run_id == tracker.run_id

    # the logged patch rebuilds the work tree on a clean checkout of the logged commit
    patch = Path(client.download_artifacts(tracker.run_id, "git.patch.txt", str(tmp_path))).read_bytes()
    assert patch == patch_bytes(get_git_state(repo)) and b"hunter2" not in patch
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", "--detach", tags["rlab.git.commit"])
    git(clone, "apply", "--binary", "-", input=patch)
    assert (clone / "train.py").read_text() == "lr = 3e-4\n"
    assert (clone / "weights.bin").read_bytes() == (repo / "weights.bin").read_bytes()


class Optim(Config):
    lr: float = 3e-4


class TrainConfig(Config):
    seed: int = 0
    optim: Optim = Optim()


def test_config_object_is_logged_and_reloadable(sqlite_uri: str, repo: Path, tmp_path: Path) -> None:
    with ExperimentTracker("cfg", tracking_uri=sqlite_uri, repo_path=repo, config=TrainConfig(seed=7)) as tracker:
        pass
    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"seed": "7", "optim.lr": "0.0003"}
    assert run.data.tags["rlab.config.class"].endswith("TrainConfig")
    path = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    assert TrainConfig.from_yaml(Path(path)) == TrainConfig(seed=7)


def test_many_and_long_params_within_mlflow_limits(mlflow_server, repo: Path) -> None:
    params = {"layers": {f"w{i}": i for i in range(250)}, "notes": "x" * 7000, "odd key!": 1}
    with ExperimentTracker("limits", tracking_uri=mlflow_server.uri, repo_path=repo) as tracker:
        with pytest.warns(UserWarning, match="'notes'"):
            tracker.log_config(params)
    stored = MlflowClient(mlflow_server.uri).get_run(tracker.run_id).data.params
    assert len(stored) == 252 and len(stored["notes"]) == 6000 and stored["odd key_"] == "1"



def test_tracker_and_loop_telemetry_log_the_same_param_strings(sqlite_uri: str, repo: Path, tmp_path: Path) -> None:
    """A Config logged by the tracker and again by MLFlowTelemetry (a Loop's log_config) is accepted by MLflow,
    which refuses a param whose value changes: lists of strings, nested Configs and long values included."""
    from researchlab.design.mlflow_telemetry import MLFlowTelemetry

    class Env(Config):
        names: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1")

    class Run(Config):
        env: Env = Env()
        notes: str = "x" * 7000
        flags: tuple[bool, ...] = (True, False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ExperimentTracker("same", tracking_uri=sqlite_uri, repo_path=repo, config=Run()) as tracker:
            telemetry = MLFlowTelemetry(run_id=tracker.run_id, tracking_uri=tracker.tracking_uri,
                                        spool_dir=tmp_path / "spool")
            telemetry.log_params(Run())
            assert telemetry.close() is None  # nothing rejected, nothing spooled
    assert not [w for w in caught if "rejected" in str(w.message)], [str(w.message) for w in caught]
    params = MlflowClient(sqlite_uri).get_run(tracker.run_id).data.params
    assert params["env.names"] == '["CartPole-v1", "Acrobot-v1"]' and params["flags"] == "[true, false]"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("...[truncated]")

# ---- ending: FAILED, KILLED, never left active ------------------------------------------------------------

def test_exception_fails_the_run_and_propagates(uri: str, repo: Path) -> None:
    tracker = ExperimentTracker("errors", tracking_uri=uri, repo_path=repo)
    with pytest.raises(ZeroDivisionError):
        with tracker:
            1 / 0
    assert mlflow.active_run() is None
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED" == tracker.status


def test_keyboard_interrupt_kills_the_run(uri: str, repo: Path) -> None:
    tracker = ExperimentTracker("errors", tracking_uri=uri, repo_path=repo)
    with pytest.raises(KeyboardInterrupt):
        with tracker:
            raise KeyboardInterrupt
    assert mlflow.active_run() is None
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"


def test_nested_run_left_open_is_ended_too(sqlite_uri: str, repo: Path) -> None:
    with pytest.raises(RuntimeError, match="inner"):
        with ExperimentTracker("nested", tracking_uri=sqlite_uri, repo_path=repo) as tracker:
            inner = mlflow.start_run(nested=True)
            raise RuntimeError("inner")
    client = MlflowClient(sqlite_uri)
    assert mlflow.active_run() is None
    assert client.get_run(inner.info.run_id).info.status == "FAILED"
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_failure_on_entry_ends_the_started_run(sqlite_uri: str, repo: Path, tmp_path: Path) -> None:
    # keys that collide once sanitized for MLflow are found while logging, after the run has started
    tracker = ExperimentTracker("entry", tracking_uri=sqlite_uri, repo_path=repo, config={"a@b": 1, "a_b": 2})
    with pytest.raises(ValueError, match="both become 'a_b'"):
        tracker.__enter__()
    assert mlflow.active_run() is None
    runs = experiment_runs(MlflowClient(sqlite_uri), "entry")
    assert [r.info.status for r in runs] == ["FAILED"] and runs[0].info.run_id == tracker.run_id


def test_a_bad_config_file_is_refused_before_any_run(sqlite_uri: str, repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="bad.yaml' must hold a YAML mapping"):
        ExperimentTracker("entry-file", tracking_uri=sqlite_uri, repo_path=repo, config=bad)
    with pytest.raises(FileNotFoundError, match="no config file at 'missing.yaml'"):
        ExperimentTracker("entry-file", tracking_uri=sqlite_uri, repo_path=repo, config="missing.yaml")
    assert mlflow.active_run() is None
    assert MlflowClient(sqlite_uri).get_experiment_by_name("entry-file") is None  # nothing was created


def test_store_down_at_exit_leaves_no_active_run(fresh_mlflow_server, sqlite_uri: str, repo: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.warns(UserWarning, match="may show it as RUNNING"):
        with ExperimentTracker("outage", tracking_uri=fresh_mlflow_server.uri, repo_path=repo) as tracker:
            fresh_mlflow_server.stop()
    assert mlflow.active_run() is None and tracker.status == "FINISHED"
    with ExperimentTracker("after-outage", tracking_uri=sqlite_uri, repo_path=repo) as after:  # not stuck
        pass
    assert MlflowClient(sqlite_uri).get_run(after.run_id).info.status == "FINISHED"


# ---- ids, resume, refusals --------------------------------------------------------------------------------

def test_resume_continues_the_same_run(uri: str, repo: Path) -> None:
    with ExperimentTracker("resume", tracking_uri=uri, repo_path=repo) as first:
        mlflow.log_metric("step_return", 1.0, step=0)
    first_commit = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "commit", "-qam", "more")  # the code moved on before the restart
    with ExperimentTracker("resume", first.run_name, uri, resume=True, repo_path=repo) as again:
        mlflow.log_metric("step_return", 2.0, step=1)
    client = MlflowClient(uri)
    assert again.run_id == first.run_id and len(experiment_runs(client, "resume")) == 1
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(first.run_id, "step_return")] == [1.0, 2.0]
    assert run.data.tags["rlab.git.commit"] == first_commit
    assert run.data.tags["rlab.git.resumed_commit"] == git(repo, "rev-parse", "HEAD").strip()
    names = sorted(a.path for a in client.list_artifacts(first.run_id))
    assert names[0].startswith("git-resume-") and names[0].endswith(".patch.txt") and names[1] == "git.patch.txt"


def test_taken_or_missing_names_are_refused_before_a_run_starts(sqlite_uri: str, repo: Path) -> None:
    with ExperimentTracker("names", "2026-01-01_brave-otter", sqlite_uri, repo_path=repo):
        pass
    client = MlflowClient(sqlite_uri)
    with pytest.raises(ValueError, match=r"'2026-01-01_brave-otter' already exists.*resume=True"):
        ExperimentTracker("names", "2026-01-01_brave-otter", sqlite_uri, repo_path=repo).__enter__()
    with pytest.raises(LookupError, match="no run '2026-01-01_calm-yak' to resume"):
        ExperimentTracker("names", "2026-01-01_calm-yak", sqlite_uri, resume=True, repo_path=repo).__enter__()
    with pytest.raises(ValueError, match="belongs to experiment"):
        ExperimentTracker("other", "2026-01-01_brave-otter", sqlite_uri, resume=True, repo_path=repo).__enter__()
    assert len(experiment_runs(client, "names")) == 1 and experiment_runs(client, "other") == []
    with pytest.raises(ValueError, match="experiment_name"):
        ExperimentTracker("  ")
    with pytest.raises(ValueError, match="run_name"):
        ExperimentTracker("names", "it's")
    with pytest.raises(ValueError, match="resume=True needs the run_name"):
        ExperimentTracker("names", resume=True)


def test_deleted_experiment_is_refused(sqlite_uri: str, repo: Path) -> None:
    client = MlflowClient(sqlite_uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(ValueError, match="'gone'.*deleted"):
        ExperimentTracker("gone", tracking_uri=sqlite_uri, repo_path=repo).__enter__()


def test_active_run_elsewhere_is_refused_and_kept(sqlite_uri: str, repo: Path) -> None:
    mlflow.set_tracking_uri(sqlite_uri)
    outer = mlflow.start_run()
    with pytest.raises(RuntimeError, match=outer.info.run_id):
        ExperimentTracker("busy", tracking_uri=sqlite_uri, repo_path=repo).__enter__()
    assert mlflow.active_run().info.run_id == outer.info.run_id
    mlflow.end_run()


def test_tracker_runs_once(sqlite_uri: str, repo: Path) -> None:
    tracker = ExperimentTracker("once", tracking_uri=sqlite_uri, repo_path=repo)
    with tracker:
        pass
    with pytest.raises(RuntimeError, match="runs once"):
        tracker.__enter__()
    with pytest.raises(RuntimeError, match="needs an active run"):
        tracker.log_config({"a": 1})


def test_generated_ids_skip_taken_ones(uri: str) -> None:
    client = MlflowClient(uri)
    exp = client.create_experiment(f"ids-{random.randrange(10**9)}")
    day = date(2026, 2, 15)
    draw = random.Random(11)
    first = [f"{day}_{draw.choice(_ADJECTIVES)}-{draw.choice(_ANIMALS)}" for _ in range(4)]
    assert len(set(first)) == 4
    for rid in first[:3]:
        client.create_run(exp, tags={"rlab.run_id": rid})
    deleted = client.create_run(exp, tags={"rlab.run_id": first[3]})
    client.delete_run(deleted.info.run_id)  # a deleted run still holds its id
    rid = generate_run_id(client, day=day, rng=random.Random(11))
    assert rid not in first and rid.startswith("2026-02-15_")
    assert find_run_by_rlab_id(first[3], client) is None  # deleted runs are not found...
    assert find_run_by_rlab_id(first[0], client, experiment_ids=[exp]).data.tags["rlab.run_id"] == first[0]


# ---- where runs go, and no git at all ---------------------------------------------------------------------

def test_default_uri_is_sqlite_in_the_project_root(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (repo / "nbs").mkdir()
    monkeypatch.chdir(repo / "nbs")  # a notebook runs in its own folder
    with ExperimentTracker("default-uri") as tracker:
        mlflow.log_metric("x", 1.0)
    assert tracker.tracking_uri == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert (repo / "mlflow.db").is_file() and not (repo / "nbs/mlflow.db").exists()
    assert (repo / "mlruns").is_dir() and not (repo / "nbs/mlruns").exists()
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_configured_uri_wins_over_the_default(sqlite_uri: str, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    assert resolve_tracking_uri(None, repo) == sqlite_uri
    assert resolve_tracking_uri("http://127.0.0.1:1", repo) == "http://127.0.0.1:1"


def test_outside_a_repository_the_run_starts_with_one_warning(sqlite_uri: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ExperimentTracker("no-git", tracking_uri=sqlite_uri, repo_path=plain) as tracker:
            pass
    git_warnings = [w for w in caught if issubclass(w.category, GitStateWarning)]
    assert len(git_warnings) == 1 and str(plain) in str(git_warnings[0].message)
    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["rlab.git.available"] == "false"
    assert "rlab.git.commit" not in run.data.tags and client.list_artifacts(tracker.run_id) == []


def test_large_untracked_file_is_tagged(sqlite_uri: str, repo: Path) -> None:
    (repo / "dump.bin").write_bytes(b"\0" * 2048)
    with pytest.warns(GitStateWarning, match="dump.bin"):
        with ExperimentTracker("big", tracking_uri=sqlite_uri, repo_path=repo, max_untracked_bytes=1024) as tracker:
            pass
    tags = MlflowClient(sqlite_uri).get_run(tracker.run_id).data.tags
    assert tags["rlab.git.skipped"] == "dump.bin" and tags["rlab.git.dirty"] == "true"


def test_generated_id_taken_meanwhile_by_another_process(sqlite_uri: str, repo: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    "Another process starts a run with the same id between our check and our start: ours draws again."
    import researchlab.tracking.tracker as tracker_module

    client = MlflowClient(sqlite_uri)
    rival_exp = client.create_experiment("rival")
    real_generate = tracker_module.generate_run_id
    drawn: list[str] = []

    def generate_then_lose_the_race(c: MlflowClient) -> str:
        rid = real_generate(c)
        if not drawn:  # the first draw: a rival run takes the id before ours starts
            client.create_run(rival_exp, start_time=int(time.time() * 1000) - 1000, tags={"rlab.run_id": rid})
        drawn.append(rid)
        return rid

    monkeypatch.setattr(tracker_module, "generate_run_id", generate_then_lose_the_race)
    with ExperimentTracker("race", tracking_uri=sqlite_uri, repo_path=repo) as tracker:
        pass
    assert len(drawn) == 2 and tracker.run_name == drawn[1] != drawn[0]
    run = client.get_run(tracker.run_id)
    assert run.data.tags["rlab.run_id"] == run.info.run_name == drawn[1]
    assert find_run_by_rlab_id(drawn[0], client).info.experiment_id == rival_exp


# ---- an interrupt inside an MLflow call ------------------------------------------------------------------------
@pytest.mark.parametrize("statement", ["SELECT", "UPDATE", "INSERT"])
def test_an_interrupt_inside_a_store_call_still_ends_the_run_killed(tmp_path: Path, statement: str) -> None:
    "Ctrl-C or SIGTERM landing while MLflow talks to the sqlite store: what that call left open must not keep the "
    "run RUNNING (an open read holds a lock that made ending the run fail after 20 s of waiting)."
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    armed: list[bool] = []

    def interrupt(conn: object, cursor: object, sql: str, *args: object) -> None:  # a real statement has run
        if armed and sql.lstrip().upper().startswith(statement):
            armed.clear()
            raise KeyboardInterrupt

    event.listen(Engine, "after_cursor_execute", interrupt)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with ExperimentTracker("interrupted", tracking_uri=uri, repo_path=tmp_path) as t:
                armed.append(True)
                for i in range(20):
                    t.client.set_tag(t.run_id, f"t{i}", "v")
                    t.client.log_metric(t.run_id, "m", float(i), step=i)
                    t.client.get_run(t.run_id)
        assert not armed, f"no {statement} statement ran"
    finally:
        event.remove(Engine, "after_cursor_execute", interrupt)
    took = time.monotonic() - start
    assert MlflowClient(uri).get_run(t.run_id).info.status == "KILLED"
    assert not [w for w in seen if "could not mark" in str(w.message)], [str(w.message) for w in seen]
    assert took < 15, f"ending the interrupted run took {took:.1f} s"


def test_a_failing_user_frame_keeps_its_locals_even_in_a_folder_named_mlflow(tmp_path: Path) -> None:
    "Only MLflow's, SQLAlchemy's and sqlite3's own frames are cleared at the end of a failed run (they are found by "
    "module name): the user's frames keep their locals for a post-mortem, wherever their file lives."
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    source = tmp_path / "mlflow" / "my_experiment.py"  # a user's project folder that happens to be called mlflow
    source.parent.mkdir()
    code = compile("def fail():\n    evidence = 42\n    raise ValueError('user error')\n", str(source), "exec")
    user_module: dict[str, object] = {"__name__": "my_experiment"}
    exec(code, user_module)
    with pytest.raises(ValueError, match="user error") as info:
        with ExperimentTracker("user-error", tracking_uri=uri, repo_path=tmp_path):
            user_module["fail"]()  # type: ignore[operator]
    frames = [tb.tb_frame for tb in _tracebacks(info.value.__traceback__)]
    failed = [f for f in frames if f.f_code.co_filename == str(source)]
    assert failed and failed[0].f_locals.get("evidence") == 42


def _tracebacks(tb: object) -> list:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next  # type: ignore[attr-defined]
    return out

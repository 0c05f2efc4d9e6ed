"""The tracking store fails fast and safely: an unreachable server is named in seconds, the default sqlite store is
created so that a kill -9 or a concurrent first run cannot break it, and a file that is not a store is named."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import free_port
from mlflow import MlflowClient

from researchlab.design.mlflow_rules import _store_state, prepare_sqlite_store


@pytest.fixture(autouse=True)
def clean_mlflow(monkeypatch: pytest.MonkeyPatch, isolated_git: None) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


# ---- an unreachable tracking server ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_unreachable_server_fails_in_seconds_in_the_tracker(tmp_path: Path) -> None:
    from researchlab.design.mlflow_rules import TrackingServerUnreachable
    from researchlab.tracking.tracker import ExperimentTracker

    dead = f"http://alice:s3cret@127.0.0.1:{free_port()}"  # nothing listens here
    start = time.monotonic()
    with pytest.raises(TrackingServerUnreachable) as info:
        ExperimentTracker("dead", tracking_uri=dead, repo_path=tmp_path).__enter__()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert dead.replace("s3cret", "***") in message and "s3cret" not in message
    assert "mlflow server" in message and "sqlite" in message  # the two fixes
    assert isinstance(info.value, ConnectionError) and mlflow.active_run() is None


@pytest.mark.timeout(120)
def test_unreachable_server_fails_in_seconds_in_telemetry(tmp_path: Path) -> None:
    from researchlab.design.mlflow_rules import TrackingServerUnreachable
    from researchlab.design.mlflow_telemetry import MLFlowTelemetry

    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingServerUnreachable, match=f"{dead}.*mlflow server"):
        MLFlowTelemetry(tracking_uri=dead, experiment="dead", spool_dir=tmp_path / "spool")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "spool").exists()  # nothing spooled, no sender left behind


def test_reachable_server_and_other_stores_pass_the_check(mlflow_server, tmp_path: Path) -> None:
    from researchlab.design.mlflow_rules import check_reachable

    check_reachable(mlflow_server.uri)
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # not a server: nothing to check
    check_reachable("databricks")


# ---- the default sqlite store ---------------------------------------------------------------------------------

def test_a_file_that_is_not_a_store_is_named(tmp_path: Path) -> None:
    from researchlab.design.mlflow_telemetry import MLFlowTelemetry
    from researchlab.tracking.tracker import ExperimentTracker

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(ValueError, match=rf"ExperimentTracker: {db} is not an MLflow tracking store.*move it away"):
        ExperimentTracker("x", tracking_uri=f"sqlite:///{db}", repo_path=tmp_path).__enter__()
    with pytest.raises(ValueError, match=rf"MLFlowTelemetry: {db} is not an MLflow tracking store"):
        MLFlowTelemetry(tracking_uri=f"sqlite:///{db}", spool_dir=tmp_path / "spool")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE notes (x)")
    with pytest.raises(ValueError, match=r"other.db is not an MLflow tracking store: a SQLite database without"):
        ExperimentTracker("x", tracking_uri=f"sqlite:///{other}", repo_path=tmp_path).__enter__()
    assert db.read_bytes().startswith(b"this is not")  # left as it was


def test_a_store_left_incomplete_is_moved_aside_and_created_again(tmp_path: Path) -> None:
    "What a kill -9 during MLflow's in-place creation left behind: some tables, no schema version, no runs."
    from researchlab.tracking.tracker import ExperimentTracker

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name VARCHAR(256))")
        con.execute("CREATE TABLE latest_metrics (key VARCHAR(250))")
    with pytest.warns(UserWarning, match=rf"{db} was left incomplete.*moved to {db}.incomplete-"):
        with ExperimentTracker("again", tracking_uri=f"sqlite:///{db}", repo_path=tmp_path) as tracker:
            mlflow.log_metric("x", 1.0)
    assert MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id).info.status == "FINISHED"
    assert len(list(tmp_path.glob("mlflow.db.incomplete-*"))) == 1


CREATE = """
import sys
from researchlab.design.mlflow_rules import prepare_sqlite_store
print("ready", flush=True)
prepare_sqlite_store(sys.argv[1])
"""


def spawn(uri: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", CREATE, uri], env=env, stdout=subprocess.PIPE, text=True)


@pytest.mark.timeout(600)
def test_kill_9_during_the_first_creation_never_breaks_the_store(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    uri, rng = f"sqlite:///{db}", random.Random(0)
    for _ in range(10):
        proc = spawn(uri)
        assert proc.stdout.readline().strip() == "ready"  # killed only once it has started creating
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not db.exists() or _store_state(db) == "ok"  # never a half-made store in place
        if db.exists():
            db.unlink()
    prepare_sqlite_store(uri)  # stale temporary files of the killed creations are cleared
    assert _store_state(db) == "ok" and [p.name for p in tmp_path.glob("mlflow.db*")] == ["mlflow.db"]
    client = MlflowClient(uri)
    assert client.get_experiment("0").name == "Default"


@pytest.mark.timeout(600)
def test_concurrent_first_runs_share_one_store(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    procs = [spawn(f"sqlite:///{db}") for _ in range(3)]
    for p in procs:
        p.communicate(timeout=300)
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert _store_state(db) == "ok"
    assert MlflowClient(f"sqlite:///{db}").search_experiments()[0].name == "Default"


def test_a_cache_folder_that_cannot_be_written_still_gives_a_store(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    "New stores are copies of an empty one kept in the user cache; without a cache they are made by MLflow itself."
    from researchlab.design.mlflow_rules import store_template_path

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    db = tmp_path / "mlflow.db"
    prepare_sqlite_store(f"sqlite:///{db}")
    assert _store_state(db) == "ok" and not store_template_path().exists()
    assert MlflowClient(f"sqlite:///{db}").get_experiment("0").name == "Default"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a cache that can be written: kept, then copied
    for name in ("first.db", "second.db"):
        prepare_sqlite_store(f"sqlite:///{tmp_path / name}")
        client = MlflowClient(f"sqlite:///{tmp_path / name}")
        assert client.get_experiment("0").artifact_location == str(Path.cwd() / "mlruns" / "0")
        run = client.create_run(client.create_experiment(f"e-{name}"))
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    with sqlite3.connect(store_template_path()) as con:
        assert con.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] == 0  # no run, no experiment leaked

"""The tracking store fails fast and safely: an unreachable server is named in seconds, the default sqlite store is
created so that a kill -9 or a concurrent first run cannot break it, and a file that is not a store is named."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import free_port


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

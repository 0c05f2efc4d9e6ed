"""Secrets stay out of what a run records: secret-looking untracked files are left out of the git patch (named in
a warning and the run's tags, overridable), the tracking store's own files are never captured, and credentials in
a tracking URI or MLflow's environment never reach a spool file, stderr, a warning or a tag."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from test_git_state import checked_state, git, make_repo, write

import researchlab.tracking.utils as tracking_utils
from researchlab.tracking.utils import SECRET_PATTERNS, GitStateWarning, get_git_state

pytestmark = pytest.mark.usefixtures("isolated_git")  # conftest: git identity and config for these tests only

SECRETS = {".env.local": "API_TOKEN=hunter2\n", "deploy/server.pem": "-----BEGIN PRIVATE KEY-----hunter2\n",
           "tls.key": "hunter2", "keys/id_rsa": "hunter2", "aws/credentials": "aws_secret=hunter2\n",
           ".netrc": "machine x password hunter2\n", "config/.env": "PW=hunter2\n"}


def secret_repo(tmp_path: Path) -> Path:
    repo = make_repo(tmp_path / "repo", {"train.py": "lr = 1\n"})
    write(repo, {**SECRETS, "notes.md": "keep me\n", "train.py": "lr = 2\n"})
    return repo


# ---- secret-looking untracked files --------------------------------------------------------------------------

def test_secret_looking_untracked_files_are_left_out_and_each_is_named(tmp_path: Path) -> None:
    repo = secret_repo(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = get_git_state(repo)
    assert "hunter2" not in state["patch"] and "keep me" in state["patch"] and "lr = 2" in state["patch"]
    assert set(state["excluded"]) == set(SECRETS) and state["skipped"] == {} and state["is_dirty"]
    assert state["excluded"][".env.local"] == "matches '.env*'"
    messages = [str(w.message) for w in caught if issubclass(w.category, GitStateWarning)]
    assert len(messages) == 1 and all(name in messages[0] for name in SECRETS), messages
    assert "exclude_untracked" in messages[0]  # the warning says how to capture them after all
    checked_state(repo, tmp_path)  # the user's index stays as it was; the patch rebuilds the rest of the tree


def test_the_exclusions_are_the_users_to_change(tmp_path: Path) -> None:
    repo = secret_repo(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        everything = get_git_state(repo, exclude_untracked=())
    assert everything["excluded"] == {} and not caught
    assert all(name in everything["patch"] for name in SECRETS)
    with pytest.warns(GitStateWarning, match="notes.md"):
        custom = get_git_state(repo, exclude_untracked=["*.md", "deploy/*"])
    assert set(custom["excluded"]) == {"notes.md", "deploy/server.pem"} and ".env.local" in custom["patch"]
    assert {".env*", "*.pem", "*.key", "id_rsa*", "credentials*", ".netrc"} <= set(SECRET_PATTERNS)
    with pytest.raises(TypeError, match="exclude_untracked"):
        get_git_state(repo, exclude_untracked="*.md")  # a lone string would be read as single characters


def test_tracked_files_are_never_excluded(tmp_path: Path) -> None:
    "Only untracked files are judged by name: a committed `.env.example` edit is part of the code."
    repo = make_repo(tmp_path / "repo", {".env.example": "TOKEN=\n"})
    write(repo, {".env.example": "TOKEN=changeme\n"})
    state, _ = checked_state(repo, tmp_path)
    assert "changeme" in state["patch"] and state["excluded"] == {}


def test_the_tracking_stores_own_files_are_never_captured(tmp_path: Path) -> None:
    store = {"mlflow.db": b"SQLite format 3\0", "mlflow.db-journal": b"j", "mlflow.db-wal": b"w",
             "mlflow.db-shm": b"s", "mlflow-spool/mlflow-spool-x.jsonl": "{}\n",
             "nbs/mlflow-spool/mlflow-spool-y.jsonl": "{}\n", "mlruns/0/meta.yaml": "name: Default\n"}
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    write(repo, store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = get_git_state(repo, exclude_untracked=())  # even with no exclusions at all
    assert not caught and state["patch"] == "" and not state["is_dirty"]
    assert state["skipped"] == {} and state["excluded"] == {}


def test_a_file_vanishing_during_capture_keeps_the_git_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    "A file listed as untracked and deleted before git reads it (another run's sqlite journal) is just absent."
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    write(repo, {"scratch.tmp": "short-lived\n", "new.py": "x = 1\n"})
    real = tracking_utils._split_untracked

    def split_then_delete(*args, **kwargs):
        out = real(*args, **kwargs)
        (repo / "scratch.tmp").unlink()
        return out

    monkeypatch.setattr(tracking_utils, "_split_untracked", split_then_delete)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not capture the git state"
        state = get_git_state(repo)
    assert state is not None and "x = 1" in state["patch"] and "scratch.tmp" not in state["patch"]


def test_tracker_tags_the_excluded_files_and_passes_the_override(tmp_path: Path, sqlite_uri: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    from researchlab.tracking.tracker import ExperimentTracker

    repo = secret_repo(tmp_path)
    try:
        with pytest.warns(GitStateWarning, match=r"\.env\.local"):
            with ExperimentTracker("secrets", tracking_uri=sqlite_uri, repo_path=repo) as tracker:
                pass
        client = MlflowClient(sqlite_uri)
        tags = client.get_run(tracker.run_id).data.tags
        assert tags["rlab.git.excluded"] == ", ".join(sorted(SECRETS)) and tags["rlab.git.dirty"] == "true"
        patch = Path(client.download_artifacts(tracker.run_id, "git.patch.txt", str(tmp_path))).read_text()
        assert "hunter2" not in patch and "keep me" in patch
        with ExperimentTracker("secrets", tracking_uri=sqlite_uri, repo_path=repo, exclude_untracked=()) as everything:
            pass
        assert "rlab.git.excluded" not in client.get_run(everything.run_id).data.tags
        assert ".env.local" in everything.git_state["patch"]
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    assert git(repo, "status", "--porcelain")  # the work tree is as the user left it


# ---- credentials in the tracking URI and MLflow's environment ------------------------------------------------

def test_redact_hides_url_passwords_and_mlflow_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    from researchlab.design.mlflow_rules import redact

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-abcdef")
    assert redact("http://alice:s3cret@127.0.0.1:5000/x") == "http://alice:***@127.0.0.1:5000/x"
    assert redact("see https://bob:p%40ss@host and ftp://c:d@e") == "see https://bob:***@host and ftp://c:***@e"
    assert redact("bearer tok-0123456789, basic pw-abcdef") == "bearer ***, basic ***"
    for unchanged in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000", "http://alice@host:1", "git@github.com:o/r"):
        assert redact(unchanged) == unchanged


def test_credentials_in_the_uri_reach_no_output_and_the_spool_uploads_without_them(
        fresh_mlflow_server, tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from researchlab.design.mlflow_telemetry import MLFlowTelemetry, upload_main

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")  # sent as a bearer token, ignored by this server
    secret_uri = f"http://alice:s3cret-pw@127.0.0.1:{fresh_mlflow_server.port}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tel = MLFlowTelemetry(tracking_uri=secret_uri, experiment="redact", spool_dir=tmp_path, interval=0.1,
                              max_backoff=0.2, request_timeout=1.0, close_timeout=1.0)
        for t in range(10):
            tel.log_metrics({"x": t}, step=t)
        assert tel.flush(timeout=30)
        fresh_mlflow_server.stop()
        for t in range(10, 20):
            tel.log_metrics({"x": t}, step=t)
        tel.flush(timeout=1.0)
        spool = tel.close()
    shown = capfd.readouterr().err + "\n".join(str(w.message) for w in caught) + repr(tel)
    stored = spool.read_text()
    assert "rlab upload" in shown and "cannot reach" in shown  # the messages are there ...
    for secret in ("s3cret-pw", "tok-0123456789"):  # ... without the secrets
        assert secret not in shown and secret not in stored
    header = [json.loads(line) for line in stored.splitlines() if "run_id" in line][0]
    assert header["tracking_uri"] == f"http://alice:***@127.0.0.1:{fresh_mlflow_server.port}"
    fresh_mlflow_server.start()
    assert upload_main(["upload", str(spool)]) == 0  # the password is not needed again (this server asks none)
    history = MlflowClient(fresh_mlflow_server.uri).get_metric_history(tel.run_id, "x")
    assert sorted(m.step for m in history) == list(range(20))


def test_tracker_shows_no_credentials(tmp_path: Path) -> None:
    from researchlab.tracking.tracker import ExperimentTracker

    tracker = ExperimentTracker("x", tracking_uri="http://alice:s3cret-pw@127.0.0.1:1", repo_path=tmp_path)
    assert "s3cret-pw" not in repr(tracker) and "alice:***@127.0.0.1:1" in repr(tracker)

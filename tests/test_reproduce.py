"""`reproduce` with real git repositories and real MLflow runs: the checkout of a run made from a dirty tree
(staged, unstaged, untracked, binary) holds the run's bytes; a tampered patch, a missing git state, a missing
target and an unknown commit are refused before anything is created; a differing metric is reported with its
first step; and a PPO run made by `rlab run` from a dirty clone of this project reproduces bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from researchlab.tracking.reproduce import (
    MetricDifference,
    ReproduceError,
    compare_runs,
    find_run_by_id,
    reproduce,
    reproduce_main,
    run_checkout,
    run_recipe,
)
from researchlab.tracking.tracker import GIT_PATCH, ExperimentTracker

TARGET = "project.train:experiment"


@pytest.fixture(autouse=True)
def clean_mlflow(monkeypatch: pytest.MonkeyPatch, isolated_git: None) -> Iterator[None]:
    "Git identity via env vars (conftest); no MLflow run or tracking URI leaks from one test into the next."
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


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


def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, f"git {' '.join(args)} failed: {r.stderr}"
    return r.stdout


def tree(root: Path) -> dict[str, bytes]:
    "Every file under `root` (its `.git` left out) -> its bytes."
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(root).parts}


def worktrees(repo: Path) -> int:
    return git(repo, "worktree", "list", "--porcelain").count("worktree ")


def temp_folders() -> set[Path]:
    "The temporary folders reproduce makes (a worktree each)."
    return set(Path(tempfile.gettempdir()).glob("rlab-reproduce-*"))


@pytest.fixture
def dirty_repo(tmp_path: Path) -> Path:
    "A repository with one commit, then a staged edit, an unstaged edit, a changed tracked binary, a deletion, "
    "an untracked text file and an untracked binary file."
    repo = tmp_path / "project"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "model.py").write_text("width = 8\n")
    (repo / "pkg" / "staged.py").write_text("a = 1\n")
    (repo / "table.bin").write_bytes(bytes(range(256)))
    (repo / "old.txt").write_text("to be deleted\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    (repo / "pkg" / "staged.py").write_text("a = 2\n")
    git(repo, "add", "pkg/staged.py")
    (repo / "pkg" / "model.py").write_text("width = 16  # not staged\n")
    (repo / "table.bin").write_bytes(bytes(reversed(range(256))) + b"\0\r\n")
    (repo / "old.txt").unlink()
    (repo / "notes.txt").write_text("untracked\n")
    (repo / "weights.bin").write_bytes(b"\0\xff\x00\x10binary\0")
    return repo


def tracked_run(uri: str, repo: Path, metrics: list[float] | None = None, target: str | None = TARGET,
                cli: dict | None = None) -> ExperimentTracker:
    "A run made by `ExperimentTracker` in `repo`, with the target tag and CLI config `rlab run` records."
    tags = {"rlab.target": target} if target else {}
    with ExperimentTracker("reproduce-test", tracking_uri=uri, repo_path=repo, log_notebook=False, tags=tags) as t:
        mlflow.log_dict(cli if cli is not None else {"seed": 0, "lr": 0.001}, "rlab/cli.json")
        for step, value in enumerate(metrics or [], 1):
            mlflow.log_metrics({"loss": value, "lr": 0.001}, step=step)
    return t


def test_checkout_of_a_dirty_run_holds_its_bytes(sqlite_uri: str, dirty_repo: Path) -> None:
    dirty = tree(dirty_repo)
    t = tracked_run(sqlite_uri, dirty_repo)
    client = MlflowClient(sqlite_uri)
    recipe = run_recipe(find_run_by_id(t.run_name, client), client)
    assert (recipe.target, recipe.cli, recipe.base_commit) == (TARGET, {"seed": 0, "lr": 0.001},
                                                               git(dirty_repo, "rev-parse", "HEAD").strip())
    status_before = git(dirty_repo, "status", "--porcelain=v2", "--untracked-files=all")
    folders_before = temp_folders()
    with run_checkout(recipe, dirty_repo) as worktree:
        assert tree(worktree) == dirty  # text and binary, tracked and untracked, the deletion too
        assert sorted(git(worktree, "status", "--porcelain").splitlines()) == [  # all of it in the index
            "A  notes.txt", "A  weights.bin", "D  old.txt", "M  pkg/model.py", "M  pkg/staged.py", "M  table.bin"]
        assert worktrees(dirty_repo) == 2
    assert not worktree.exists() and worktrees(dirty_repo) == 1 and temp_folders() <= folders_before
    assert git(dirty_repo, "status", "--porcelain=v2", "--untracked-files=all") == status_before  # user's tree as it was
    assert tree(dirty_repo) == dirty


def test_a_tampered_patch_is_refused_naming_the_file(sqlite_uri: str, dirty_repo: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    t = tracked_run(sqlite_uri, dirty_repo)
    client = MlflowClient(sqlite_uri)
    patch = Path(client.download_artifacts(t.run_id, GIT_PATCH, str(tmp_path))).read_bytes()
    assert b"-width = 8" in patch
    (tmp_path / "edit").mkdir()
    (tmp_path / "edit" / GIT_PATCH).write_bytes(patch.replace(b"-width = 8", b"-width = 9"))
    client.log_artifact(t.run_id, str(tmp_path / "edit" / GIT_PATCH))  # the artifact changed after the run
    runs_before, folders_before = len(client.search_runs([t.experiment_id])), temp_folders()
    with pytest.raises(ReproduceError, match=r"does not apply to its base commit \w+ at pkg/model\.py"):
        reproduce(t.run_name, tracking_uri=sqlite_uri, repo=dirty_repo)
    assert worktrees(dirty_repo) == 1
    monkeypatch.chdir(dirty_repo)
    assert reproduce_main([t.run_id, "--tracking-uri", sqlite_uri]) == 2
    err = capsys.readouterr().err
    assert "at pkg/model.py" in err and t.run_name in err
    assert worktrees(dirty_repo) == 1 and len(client.search_runs([t.experiment_id])) == runs_before
    assert temp_folders() <= folders_before  # nothing left behind


def test_runs_without_git_state_target_or_commit_are_refused(sqlite_uri: str, dirty_repo: Path,
                                                             tmp_path: Path) -> None:
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    with pytest.warns(UserWarning, match="not inside a git work tree"):
        no_git = tracked_run(sqlite_uri, outside)
    with pytest.raises(ReproduceError, match="has no git state .*only runs started in a git repository"):
        reproduce(no_git.run_name, tracking_uri=sqlite_uri, repo=dirty_repo)
    notebook = tracked_run(sqlite_uri, dirty_repo, target=None)
    with pytest.raises(ReproduceError, match=r"has no rlab.target tag.*`rlab run TARGET` or `rlab demo`"):
        reproduce(notebook.run_id, tracking_uri=sqlite_uri, repo=dirty_repo)
    elsewhere = tmp_path / "other"  # a repository that lacks the run's base commit
    elsewhere.mkdir()
    git(elsewhere, "init", "-q")
    (elsewhere / "x").write_text("x\n")
    git(elsewhere, "add", "x")
    git(elsewhere, "commit", "-qm", "other")
    ok = tracked_run(sqlite_uri, dirty_repo)
    with pytest.raises(ReproduceError, match=r"base commit \w{40} of run .* is not in the repository"):
        reproduce(ok.run_name, tracking_uri=sqlite_uri, repo=elsewhere)
    with pytest.raises(ReproduceError, match="neither an rlab run id"):
        reproduce("2020-01-01_no-such-run", tracking_uri=sqlite_uri, repo=dirty_repo)
    assert worktrees(dirty_repo) == 1 and worktrees(elsewhere) == 1


def test_a_differing_metric_is_reported_at_its_first_step(sqlite_uri: str, dirty_repo: Path) -> None:
    a = tracked_run(sqlite_uri, dirty_repo, [1.0, 0.5, 0.25, 0.125])
    b = tracked_run(sqlite_uri, dirty_repo, [1.0, 0.5, 0.25, 0.125])
    c = tracked_run(sqlite_uri, dirty_repo, [1.0, 0.5, 0.25000001, 0.12])
    same = compare_runs(a.run_name, b.run_id, tracking_uri=sqlite_uri)
    assert same.identical and (same.metrics_compared, same.points_compared) == (2, 8)
    other = compare_runs(a.run_name, c.run_name, tracking_uri=sqlite_uri)
    assert not other.identical
    assert other.first_difference == MetricDifference("loss", 3, 0.25, 0.25000001)
    assert other.differing_metrics == ["loss"]
    text = repr(other)
    assert "different: loss at step 3: 0.25 (original) vs 0.25000001 (reproduced)" in text
    assert "**not reproduced**" in other._repr_markdown_()


# ---- through `rlab run`: a toy builder in the dirty repository (compiles in a second) --------------------------------
TOY = """from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
from pydantic import Field

from researchlab.design.core import Clock, Config, State
from researchlab.design.data import NoBatch
from researchlab.design.loop import Loop
from researchlab.tracking.run import Experiment


class ToyCLI(Config):
    "Options of the toy builder."
    steps: int = Field(4, gt=0, description="Loop steps")
    seed: int = Field(0, description="the noise's seed; -1: the clock's nanoseconds (a run nobody can reproduce)")


class ToyConfig(Config):
    "The toy's full config."
    steps: int
    seed: int


class ToyState(State):
    "Parameters, a PRNG key, the Clock."
    w: jax.Array
    key: jax.Array
    clock: Clock


def toy_step(state: ToyState, config: ToyConfig, batch: object = None) -> tuple[ToyState, dict[str, jax.Array]]:
    key, sub = jax.random.split(state.key)
    w = state.w - 0.1 * (2.0 * (state.w - 1.0) + 0.3 * jax.random.normal(sub, state.w.shape))
    new = eqx.tree_at(lambda s: (s.w, s.key, s.clock), state, (w, key, state.clock.advance(steps=1)))
    return new, {"loss": jnp.sum((w - 1.0) ** 2), "w0": w[0]}


def experiment(cli: ToyCLI) -> Experiment:
    "A noisy quadratic descent."
    seed = time.time_ns() % 2**31 if cli.seed < 0 else cli.seed
    config = ToyConfig(steps=cli.steps, seed=cli.seed)

    def init() -> ToyState:
        return ToyState(w=jnp.zeros(3), key=jax.random.key(seed), clock=Clock())

    def make_loop(state: ToyState, **kw: object) -> Loop:
        return Loop(config, state, toy_step, NoBatch(), log_every=1, save_every=2, **kw)

    return Experiment(config, init_state=init, make_loop=make_loop, num_steps=config.steps, experiment="toy")
"""


def _env(cwd: Path) -> dict[str, str]:
    "Importing from `cwd` first (as `rlab run` from a checkout does), JAX on CPU."
    return {**os.environ, "PYTHONPATH": str(cwd), "JAX_PLATFORMS": "cpu"}


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    "`python ARGS` in `cwd`, importing from `cwd` first."
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=600)


@pytest.fixture
def toy_repo(dirty_repo: Path) -> Path:
    "The dirty repository with the toy builder committed under its changes."
    (dirty_repo / "toy.py").write_text(TOY)
    (dirty_repo / ".gitignore").write_text("runs/\n__pycache__/\n")
    git(dirty_repo, "add", "toy.py", ".gitignore")
    git(dirty_repo, "commit", "-qm", "toy builder")
    return dirty_repo


def test_a_run_that_does_not_reproduce_is_reported_with_its_first_difference(
        sqlite_uri: str, toy_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    made = _python(["-m", "researchlab.cli", "run", "toy:experiment", "seed=-1", "--experiment", "toy",
                    "--tracking-uri", sqlite_uri, "--runs-dir", str(tmp_path / "runs"), "--no-progress"], toy_repo)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    original = made.stdout.strip().splitlines()[-1].split()[3]
    monkeypatch.chdir(toy_repo)
    monkeypatch.setenv("PYTHONPATH", "")  # the re-run imports toy.py from the worktree alone
    assert reproduce_main([original, "--tracking-uri", sqlite_uri]) == 1
    out = capsys.readouterr().out
    assert "rlab run: finished" in out  # the re-run's own output came through
    report = out.rsplit("\n\n", 1)[1]
    assert "different: loss at step 1:" in report and "metrics that differ  loss, w0" in report, report
    client = MlflowClient(sqlite_uri)
    [again] = client.search_runs([find_run_by_id(original, client).info.experiment_id],
                                 f"tags.`rlab.reproduces` = '{original}'")
    got = compare_runs(original, again.info.run_id, tracking_uri=sqlite_uri)
    assert (got.first_difference.metric, got.first_difference.step, got.points_compared) == ("loss", 1, 8)
    assert got.first_difference.original != got.first_difference.reproduced
    assert (got.environment, got.config) == ([], [])  # same machine, same config: the seed is what differs
    assert worktrees(toy_repo) == 1


def test_sigterm_stops_the_rerun_and_removes_the_worktree(sqlite_uri: str, toy_repo: Path) -> None:
    "A recipe of a long run (tags and artifacts as `rlab run` logs them); `rlab reproduce` is stopped mid-run."
    t = tracked_run(sqlite_uri, toy_repo, target="toy:experiment", cli={"steps": 10**8, "seed": 0})
    proc = subprocess.Popen([sys.executable, "-m", "researchlab.cli", "reproduce", t.run_name, "--tracking-uri",
                             sqlite_uri], cwd=toy_repo, env=_env(toy_repo), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # wait until the re-run has started its MLflow run
        seen.append(line)
        if line.startswith("rlab run: run "):
            break
    assert worktrees(toy_repo) == 2, "".join(seen)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(seen) + out + err
    assert "interrupted; the re-run was stopped" in err
    assert worktrees(toy_repo) == 1
    client = MlflowClient(sqlite_uri)
    [again] = client.search_runs([t.experiment_id], f"tags.`rlab.reproduces` = '{t.run_name}'")
    assert again.info.status == "KILLED", "".join(seen) + out + err


# ---- end to end: a PPO run made by `rlab run` from a dirty clone of this project ----------------------------------
ROOT = Path(__file__).resolve().parents[1]

BUILDER = '''"""A builder that only exists in the run's patch: it needs the staged and unstaged edits and the binary file."""
from __future__ import annotations

from pathlib import Path

from researchlab.examples import REPRO_LR, REPRO_SEED_OFFSET
from researchlab.examples.demo import DemoCLIConfig, ppo_experiment
from researchlab.tracking.run import Experiment

SEED = Path(__file__).with_name("seed.bin").read_bytes()[1]


def experiment(cli: DemoCLIConfig) -> Experiment:
    return ppo_experiment(cli.replace(lr=REPRO_LR, seed=cli.seed + SEED + REPRO_SEED_OFFSET))
'''


def test_a_ppo_run_from_a_dirty_clone_reproduces_bit_for_bit(mlflow_server, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ROOT), str(clone))
    init = clone / "researchlab" / "examples" / "__init__.py"
    init.write_text(init.read_text() + "REPRO_LR = 5e-4\n")
    git(clone, "add", str(init.relative_to(clone)))  # staged
    init.write_text(init.read_text() + "REPRO_SEED_OFFSET = 1\n")  # unstaged, on top
    (clone / "myexp.py").write_text(BUILDER)  # untracked
    (clone / "seed.bin").write_bytes(b"\0\x02\xff\0")  # untracked, binary
    uri, runs = mlflow_server.uri, tmp_path / "runs"
    made = _python(["-m", "researchlab.cli", "run", "myexp:experiment", "total_steps=2048", "log_every=1",
                    "save_every=2", "video=false", "--experiment", "reproduce-e2e", "--tracking-uri", uri,
                    "--runs-dir", str(runs), "--no-progress"], clone)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    original = made.stdout.strip().splitlines()[-1].split()[3]  # rlab run: finished <id> (MLflow run ...)

    done = _python(["-m", "researchlab.cli", "reproduce", original, "--tracking-uri", uri], clone)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "identical:" in done.stdout and "every value the same" in done.stdout
    client = MlflowClient(uri)
    first = find_run_by_id(original, client)
    [again] = client.search_runs([first.info.experiment_id], f"tags.`rlab.reproduces` = '{original}'")
    report = compare_runs(first.info.run_id, again.info.run_id, tracking_uri=uri)
    assert report.identical and report.metrics_compared >= 5 and report.points_compared >= 5 * 4
    assert (report.environment, report.config) == ([], [])  # same machine, same config rebuilt
    cli = json.loads(Path(client.download_artifacts(first.info.run_id, "rlab/cli.json", str(tmp_path))).read_text())
    assert (cli["seed"], cli["total_steps"], cli["video"]) == (0, 2048, False)
    assert again.data.tags["rlab.target"] == "myexp:experiment"
    assert again.data.tags["rlab.git.commit"] == first.data.tags["rlab.git.commit"]
    patches = [Path(client.download_artifacts(r.info.run_id, GIT_PATCH, str(tmp_path / r.info.run_id))).read_bytes()
               for r in (first, again)]
    assert patches[0] == patches[1]  # the reproduction ran (and recorded) the very same code
    assert worktrees(clone) == 1  # the temporary worktree is gone
    assert (clone / "runs" / again.data.tags["rlab.run_id"] / "checkpoints").is_dir()  # checkpoints kept in the project

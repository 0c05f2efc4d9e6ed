"""Concurrent runs in one repository and one sqlite store, as a sweep or two notebooks make them: two `rlab demo`
at once on a fresh store (both create it), then four at once on the existing one. Every run ends FINISHED with all
its metrics and its own git state (the commit tag and the patch artifact)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _projects import artifacts as _artifacts
from _projects import rlab_env as _env
from test_demo import _runs, project  # noqa: F401  (project is a fixture)


def _demos(project: Path, seeds: list[int]) -> list[subprocess.CompletedProcess]:  # noqa: F811
    "Start one short `rlab demo` per seed at the same moment; wait for all of them."
    procs = [subprocess.Popen([sys.executable, "-m", "researchlab.cli", "demo", "total_steps=20480", "save_every=20",
                               "video=false", f"seed={s}"], cwd=project, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in seeds]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _check_runs(project: Path, n: int, results: list[subprocess.CompletedProcess]) -> None:  # noqa: F811
    for r in results:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        assert "Traceback" not in r.stderr and "GitStateWarning" not in r.stderr, r.stderr[-3000:]
    client, runs = _runs(project)
    assert len(runs) == n, [r.info.run_name for r in runs]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, text=True, capture_output=True).stdout.strip()
    for run in runs:
        assert run.info.status == "FINISHED", run.info
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "env_steps")]
        assert steps == [10, 20, 30, 40], (run.info.run_name, steps)
        assert run.data.tags.get("rlab.git.commit") == head, run.data.tags
        assert run.data.tags.get("rlab.git.dirty") == "true", run.data.tags
        patch = [a for a in _artifacts(client, run.info.run_id) if a.endswith("git.patch.txt")]
        assert patch, (run.info.run_name, _artifacts(client, run.info.run_id))
        text = Path(client.download_artifacts(run.info.run_id, patch[0])).read_text()
        assert "print('hello, changed')" in text and "mlflow.db" not in text, text[:2000]


def test_two_at_once_on_a_fresh_store_then_four_on_the_existing_one(project: Path):  # noqa: F811
    assert not (project / "mlflow.db").exists()
    _check_runs(project, 2, _demos(project, [1, 2]))
    _check_runs(project, 6, _demos(project, [3, 4, 5, 6]))

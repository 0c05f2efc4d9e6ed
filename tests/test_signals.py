"""`rlab demo` as a job scheduler sees it: SIGTERM stops it cleanly (final checkpoint, MLflow run KILLED) and
`--resume` continues; a run being trained is locked, so a second `--resume` of it refuses, naming the holder; a
run killed before its first checkpoint is started over by `--resume`, its status honest."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from _projects import rlab_env as _env
from test_demo import _runs, project  # noqa: F401  (project is a fixture)

from researchlab.examples.demo import RunLock, RunLocked


class _Proc:
    "An `rlab demo` child whose stdout and stderr are read by threads, so the test can wait for what it prints."

    def __init__(self, cwd: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "researchlab.cli", "demo", *args], cwd=cwd, env=_env(),
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: object, buf: list[str]) -> None:
        while chunk := stream.read(1):
            buf.append(chunk)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, ready: object, what: str, timeout: float = 240) -> None:
        "Wait until `ready()` is true while the process runs; fail with its output if it ends first."
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"rlab demo never {what} (exit {self.proc.poll()}):\n{self.stdout[-2000:]}\n{self.stderr[-3000:]}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc


def _updates_done(proc: _Proc, total: int) -> int:
    "The last update count the progress bar showed (`PPO on CartPole: ... 61/3906`), 0 before the first."
    found = re.findall(rf"(\d+)/{total}\b", proc.stderr)
    return int(found[-1]) if found else 0


def _lock_holder(ckpt: Path) -> int | None:
    try:
        return int((ckpt / "rlab.lock").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


TOTAL = 3906  # updates of total_steps=2e6: fused 63 per call (62 calls), long enough to be stopped mid-run


def test_sigterm_checkpoints_kills_the_run_and_resume_continues_alone(project: Path):  # noqa: F811
    "SIGTERM = the first Ctrl-C; then two resumes at once: the second refuses, naming the first, which finishes."
    first = _Proc(project, "total_steps=2e6", "save_every=100000", "log_every=10", "video=false", "seed=5")
    first.wait_for(lambda: _updates_done(first, TOTAL) > 0, "reported a PPO update")
    first.proc.send_signal(signal.SIGTERM)
    rc = first.finish()
    assert rc == 128 + signal.SIGTERM, (first.stdout[-2000:], first.stderr[-3000:])
    out = first.stdout
    assert "Loop: SIGTERM received" in out, out
    run_id = re.search(r"rlab demo --resume (\S+)", out).group(1)
    stopped_at = int(re.search(r"interrupted at update (\d+)", out).group(1))
    assert 0 < stopped_at < TOTAL
    ckpt = project / "runs" / run_id / "checkpoints"
    # save_every is past the run's end: this checkpoint is the final one that the SIGTERM asked for
    assert sorted(p.name for p in ckpt.glob("ckpt_*.eqx")) == [f"ckpt_{stopped_at:010d}.eqx"]
    assert not (ckpt / "rlab.lock").exists()  # released on exit
    client, runs = _runs(project)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "env_steps")]
    assert logged == list(range(10, stopped_at + 1, 10))  # flushed up to the stop

    # two resumes of the same run: the second one finds the first holding the lock
    resumed = _Proc(project, "--resume", run_id)
    resumed.wait_for(lambda: _lock_holder(ckpt) == resumed.proc.pid, "took the run's lock")
    os.kill(resumed.proc.pid, signal.SIGSTOP)  # hold it there: the second resume surely finds it running
    try:
        second = subprocess.run([sys.executable, "-m", "researchlab.cli", "demo", "--resume", run_id], cwd=project,
                                env=_env(), text=True, capture_output=True, timeout=300)
    finally:
        os.kill(resumed.proc.pid, signal.SIGCONT)
    assert second.returncode == 75, (second.stdout[-2000:], second.stderr[-3000:])
    err = second.stderr.strip()
    assert err.count("\n") == 0 and f"is being trained by process {resumed.proc.pid}" in err, err
    assert f"kill {resumed.proc.pid}" in err and "Traceback" not in second.stderr
    assert not list((project / "runs").glob("*/checkpoints/*.tmp"))

    assert resumed.finish() == 0, (resumed.stdout[-2000:], resumed.stderr[-3000:])
    assert f"after {TOTAL} updates" in resumed.stdout, resumed.stdout
    assert not (ckpt / "rlab.lock").exists()
    client, runs = _runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "env_steps")]
    assert logged == list(range(10, TOTAL + 1, 10))  # every point once: nothing lost, nothing written twice


def test_resume_before_the_first_checkpoint_starts_the_run_over(project: Path):  # noqa: F811
    "kill -9 before any checkpoint: --resume says so, starts from update 0 in the same run, and ends FINISHED."
    first = _Proc(project, "total_steps=20480", "save_every=100000", "video=false", "seed=2")
    first.wait_for(lambda: bool(list(project.glob("runs/*/cli.json"))), "wrote its run folder")
    first.proc.kill()
    first.finish()
    (run_dir,) = list((project / "runs").iterdir())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # should the kill have come late
    res = subprocess.run([sys.executable, "-m", "researchlab.cli", "demo", "--resume", run_dir.name], cwd=project,
                         env=_env(), text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    assert f"run {run_dir.name} has no complete checkpoint" in res.stdout and "starting it over from update 0" in \
        res.stdout, res.stdout
    assert "after 40 updates" in res.stdout, res.stdout
    assert (run_dir / "checkpoints" / "ckpt_0000000040.eqx").is_file()
    client, runs = _runs(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["rlab.run_id"] == run_dir.name
    assert run.data.tags["rlab.restarted"].startswith("from update 0")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "env_steps")]
    assert steps[-4:] == [10, 20, 30, 40]


def test_run_lock_is_exclusive_released_and_taken_over_from_the_dead(tmp_path: Path):
    "The lock file names its live holder; a lock left by a process that died is taken over."
    with RunLock(tmp_path, "run-a") as lock:
        assert (tmp_path / "rlab.lock").read_text().split()[0] == str(os.getpid()) and lock.previous is None
    assert not (tmp_path / "rlab.lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "rlab.lock").write_text(f"{dead.pid} some-host 2026-01-01T00:00:00\n")
    with RunLock(tmp_path, "run-a") as lock:
        assert lock.previous.split()[0] == str(dead.pid)
        assert (tmp_path / "rlab.lock").read_text().split()[0] == str(os.getpid())

    code = ("import sys, time\nfrom researchlab.examples.demo import RunLock\n"
            "with RunLock(sys.argv[1], 'run-a'):\n    print('holding', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env(), text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunLocked, match=rf"run run-a is being trained by process {holder.pid} .*kill {holder.pid}"):
            RunLock(tmp_path, "run-a").acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path, "run-a") as lock:  # killed with SIGKILL: the kernel dropped its lock
        assert lock.previous.split()[0] == str(holder.pid)


def test_sigterm_outside_training_ends_the_run_killed(project: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                      capsys: pytest.CaptureFixture):
    "A SIGTERM before the Loop runs (here: while the run's files are written, the MLflow run open) ends the MLflow "
    "run KILLED, exit 143. (The first State and the compile are made in a thread, before the run exists.)"
    from researchlab.examples import demo
    from researchlab.tracking import run as run_module

    def preempted(*args: object) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.chdir(project)
    monkeypatch.setattr(run_module, "_resume_command", preempted)
    before = signal.getsignal(signal.SIGTERM)
    assert demo.demo_main(["total_steps=2048", "video=false"]) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rlab-demo").experiment_id])
    assert run.info.status == "KILLED"
    assert not list((project / "runs").glob("*/checkpoints/rlab.lock"))

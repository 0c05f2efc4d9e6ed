"""Nothing lost, nothing twice: `kill -9` of a real `rlab demo` after a checkpoint, then `--resume`, leaves every
metric's history complete with each step once; against a slow (but reachable) server the in-memory backlog stays
bounded, `close` keeps to `close_timeout`, and `rlab upload` delivers the rest; a torn spool file uploads every
intact line and reports the torn ones."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_demo import _runs, project  # noqa: F401  (project is a fixture)
from test_signals import _Proc

from researchlab.cli import main as rlab
from researchlab.design.mlflow_telemetry import MLFlowTelemetry


# ---- kill -9 after a checkpoint, then --resume ------------------------------------------------------------------
def _checkpoints(ckpt: Path) -> list[int]:
    "Steps of the complete checkpoints (a save in progress is a temp file, not `ckpt_*.eqx`)."
    return sorted(int(p.stem.split("_")[1]) for p in ckpt.glob("ckpt_*.eqx"))


def _histories(project: Path) -> tuple[str, dict[str, list[int]]]:  # noqa: F811
    "The demo run's MLflow status and, per metric key, the steps of its history in the order MLflow has them."
    client, runs = _runs(project)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    return run.info.status, {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k))
                             for k in run.data.metrics}


def _logged_past(project: Path, step: int) -> bool:  # noqa: F811
    "Whether MLflow holds an `env_steps` point past `step` (read while the demo writes)."
    client, runs = _runs(project)
    return any(m.step > step for r in runs for m in client.get_metric_history(r.info.run_id, "env_steps"))


def _kill_and_resume(project: Path, trials: int, updates: int, seed: int) -> None:  # noqa: F811
    """Start a demo run, then `trials` times: kill -9 it after a new checkpoint and `--resume`. Even trials kill at
    once (the metrics up to the checkpoint must already be durable), odd ones once points past the checkpoint are in
    MLflow (the resumed run logs those steps again: they must not be there twice)."""
    rng = random.Random(seed)
    proc = _Proc(project, f"total_steps={updates * 512}", "save_every=100", "log_every=10", "video=false", "seed=4")
    proc.wait_for(lambda: bool(list(project.glob("runs/*/cli.json"))), "wrote its run folder")
    (run_dir,) = list((project / "runs").iterdir())
    ckpt, last, kills = run_dir / "checkpoints", -1, 0
    for trial in range(trials):
        proc.wait_for(lambda: bool(_checkpoints(ckpt)) and _checkpoints(ckpt)[-1] > last, "wrote a new checkpoint")
        if trial % 2:
            at = _checkpoints(ckpt)[-1]
            proc.wait_for(lambda: _logged_past(project, at) or _checkpoints(ckpt)[-1] > at, "logged past a checkpoint")
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.proc.poll() is None:
            proc.proc.kill()
            kills += 1
        proc.finish()
        last = _checkpoints(ckpt)[-1]
        status, steps = _histories(project)
        assert steps and status in ("RUNNING", "FINISHED"), status
        for key, got in steps.items():  # durable up to the checkpoint, and no step twice
            assert len(got) == len(set(got)), (trial, key, [s for s in got if got.count(s) > 1][:10])
            assert [s for s in got if s <= last] == list(range(10, last + 1, 10)), (trial, key, last, got[:60])
        if last == updates:
            break
        proc = _Proc(project, "--resume", run_dir.name)
    else:
        assert proc.finish() == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert kills >= min(trials, 2), f"only {kills} of {trials} kills came before the run's end"
    status, steps = _histories(project)
    assert status == "FINISHED"
    assert len(steps) >= 8, sorted(steps)  # the PPO diagnostics, the return, the episode and env step counts
    for key, got in steps.items():
        assert got == list(range(10, updates + 1, 10)), (key, got[:40], len(got))


def test_kill_9_after_checkpoints_then_resume_leaves_every_step_once(project: Path):  # noqa: F811
    _kill_and_resume(project, trials=2, updates=1000, seed=0)


@pytest.mark.slow
def test_kill_9_ten_times_then_resume_leaves_every_step_once(project: Path):  # noqa: F811
    _kill_and_resume(project, trials=10, updates=3000, seed=1)


# ---- a slow tracking server ---------------------------------------------------------------------------------
class _SlowProxy(http.server.ThreadingHTTPServer):
    "Forwards every request to a real MLflow server and holds each `log-batch` answer back for `delay` seconds."

    daemon_threads = True

    def __init__(self, target: str, delay: float):
        self.target, self.delay = target, delay
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        req = urllib.request.Request(self.server.target + self.path, data=body, method=self.command,
                                     headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as e:
            status, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "application/json")
        if "log-batch" in self.path:
            time.sleep(self.server.delay)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward


@contextlib.contextmanager
def _slow_proxy(target: str, delay: float) -> Iterator[_SlowProxy]:
    proxy = _SlowProxy(target, delay)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_slow_server_bounded_backlog_close_on_time_nothing_lost(mlflow_server, tmp_path: Path):
    "Each batch takes 0.3 s: the backlog stays under max_pending + one batch, close keeps to its timeout, upload ends it."
    with _slow_proxy(mlflow_server.uri, delay=0.3) as proxy:
        tel = MLFlowTelemetry(tracking_uri=proxy.uri, experiment="slow", spool_dir=tmp_path, interval=0.05,
                              max_pending=2000, close_timeout=2.0, request_timeout=5.0)
        peak = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(20_000):  # 40k points, far faster than ~3k points/s the server takes
                tel.log_metrics({"a": t, "b": -t}, step=t)
                peak = max(peak, tel.backlog)
            start = time.monotonic()
            spool = tel.close()
            took = time.monotonic() - start
    assert peak <= 2000 + 1000 + 2, peak  # max_pending + one batch (+ one call's points)
    assert any("over 2000 points are waiting" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert took < 2.0 + 1.5, took  # close_timeout + the grace for a request in flight + writing the spool
    assert spool is not None and spool.is_file()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert rlab(["upload", str(spool), "--tracking-uri", mlflow_server.uri]) == 0
    client = MlflowClient(mlflow_server.uri)
    for key, sign in (("a", 1), ("b", -1)):
        got = sorted((m.step, m.value) for m in client.get_metric_history(tel.run_id, key))
        assert got == [(t, float(sign * t)) for t in range(20_000)], (key, len(got))
    assert client.get_run(tel.run_id).info.status == "FINISHED"  # the end of the run was spooled too


# ---- a torn spool file ----------------------------------------------------------------------------------------
def _spooled(tmp_path: Path, uri: str, steps: int) -> tuple[MLFlowTelemetry, Path]:
    "A real spool file for a run in `uri`: the telemetry's server is down, so close() spools every point."
    from conftest import free_port

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("torn") or client.get_experiment(client.create_experiment("torn"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    tel = MLFlowTelemetry(run_id=run_id, tracking_uri=f"http://127.0.0.1:{free_port()}", spool_dir=tmp_path,
                          close_timeout=0.2, request_timeout=0.5, max_backoff=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            tel.log_metrics({"x": t}, step=t)
        spool = tel.close()
    return tel, spool


def test_torn_spool_uploads_every_intact_line_and_reports_the_torn_ones(sqlite_uri: str, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture):
    tel, spool = _spooled(tmp_path, sqlite_uri, 6)
    lines = spool.read_text().splitlines()
    assert json.loads(lines[3]) == {"m": ["x", 2.0, json.loads(lines[3])["m"][2], 2]}
    lines[3] = lines[3][:12]  # cut short, as a full disk leaves it
    lines[5] = lines[5][:-1]  # another one
    spool.write_text("\n".join(lines) + "\n")
    assert rlab(["upload", str(spool), "--tracking-uri", sqlite_uri]) == 0  # everything intact was sent
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(spool))}: lines 4, 6 are torn .* skipped", err), err
    got = [m.step for m in MlflowClient(sqlite_uri).get_metric_history(tel.run_id, "x")]
    assert sorted(got) == [0, 1, 3, 5]
    assert spool.with_name(spool.name + ".uploaded").is_file() and not spool.exists()

    # a point whose header line is torn cannot be sent: exit 1, the file keeps its name, the rest is uploaded
    tel2, spool2 = _spooled(tmp_path, sqlite_uri, 3)
    lines = spool2.read_text().splitlines()
    spool2.write_text("\n".join([lines[0][:20]] + lines[1:]) + "\n")
    assert rlab(["upload", str(spool2), "--tracking-uri", sqlite_uri]) == 1
    err = capsys.readouterr().err
    assert "line 1 is torn" in err and f"{spool2}:2 holds a point before any header line" in err, err
    assert spool2.is_file()


def test_torn_spool_append_and_rerun_upload_write_no_step_twice(sqlite_uri: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture):
    "An append after a torn last line starts a new line; uploading twice (or what already reached MLflow) is a no-op."
    from researchlab.design.mlflow_telemetry import _Points, _spool_write

    tel, spool = _spooled(tmp_path, sqlite_uri, 4)
    spool.write_text(spool.read_text()[:-7])  # the last line is cut, then the next append comes
    more = _Points()
    more.metrics = [("x", 10.0, 0, 10)]
    _spool_write(spool, sqlite_uri, tel.run_id, more, note="later")
    assert rlab(["upload", str(spool), "--tracking-uri", sqlite_uri]) == 0
    assert "line 5 is torn" in capsys.readouterr().err
    again = spool.with_name(spool.name + ".again")
    spool.with_name(spool.name + ".uploaded").rename(again)
    assert rlab(["upload", str(again), "--tracking-uri", sqlite_uri]) == 0  # the same points again: skipped, none twice
    got = sorted(m.step for m in MlflowClient(sqlite_uri).get_metric_history(tel.run_id, "x"))
    assert got == [0, 1, 2, 10]

"""MLFlowTelemetry against a real MLflow server and the embedded sqlite store; console and multi telemetry."""

import io
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import mlflow
import numpy as np
import pytest
from _configs import Cfg
from mlflow import MlflowClient

from researchlab.design.mlflow_telemetry import MLFlowTelemetry, upload_main, upload_spool
from researchlab.design.telemetry import ConsoleTelemetry, MultiTelemetry, Telemetry


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    "One embedded sqlite store for this module (overrides conftest's per-test one: table creation is slow)."
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow_sqlite') / 'mlflow.db'}"


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_metrics_and_params_reach_the_real_server(mlflow_server, tmp_path: Path) -> None:
    tel = MLFlowTelemetry(tracking_uri=mlflow_server.uri, experiment="infra-tests", spool_dir=tmp_path)
    tel.log_params(Cfg(seed=3))
    tel.log_params({"model": {"width": 64, "act": "relu"}, "many": {f"p{i}": i for i in range(250)}})
    for t in range(600):  # 600 steps x 4 metrics + 255 params: several log_batch calls of at most 1000 entries
        tel.log_metrics({"loss": jnp.float32(1.0 / (t + 1)), "np": np.float64(t), "int": t,
                         "arr1": jnp.ones((1,)) * t}, step=t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tel.log_metrics({"nan": float("nan"), "inf": np.float32(np.inf)}, step=5)
        assert tel.flush(timeout=60)
    msgs = sorted(str(w.message) for w in caught if "is logged as is" in str(w.message))
    assert len(msgs) == 2 and "'inf' is inf at step 5" in msgs[0] and "'nan' is nan at step 5" in msgs[1]
    assert tel.close() is None
    assert math.isnan(history(mlflow_server.uri, tel.run_id, "nan")[0][1])
    assert history(mlflow_server.uri, tel.run_id, "inf")[0][1] in (math.inf, sys.float_info.max)
    run = MlflowClient(mlflow_server.uri).get_run(tel.run_id)
    params = run.data.params
    assert params["seed"] == "3" and params["optim.lr"] == "0.001" and params["optim.betas"] == "[0.9, 0.999]"
    assert params["model.width"] == "64" and params["model.act"] == "relu"
    assert len([k for k in params if k.startswith("many.")]) == 250
    assert run.info.status == "FINISHED"  # the telemetry created the run, so it ends it
    assert history(mlflow_server.uri, tel.run_id, "np") == [(t, float(t)) for t in range(600)]
    assert history(mlflow_server.uri, tel.run_id, "arr1")[-1] == (599, 599.0)
    loss = history(mlflow_server.uri, tel.run_id, "loss")
    assert len(loss) == 600 and loss[3] == (3, pytest.approx(0.25))
    assert tel.sent == 600 * 4 + 2 + 3 + 2 + 250


def test_logs_into_the_active_run_and_leaves_it_open(sqlite_uri: str, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(sqlite_uri)
    try:
        with mlflow.start_run() as run:
            with MLFlowTelemetry(spool_dir=tmp_path) as tel:
                assert tel.run_id == run.info.run_id and not tel.owns_run
                tel.log_metrics({"a": 1.0}, step=0)
            assert MlflowClient(sqlite_uri).get_run(run.info.run_id).info.status == "RUNNING"
        assert history(sqlite_uri, run.info.run_id, "a") == [(0, 1.0)]
    finally:
        mlflow.set_tracking_uri(None)


def test_nan_and_inf_are_logged_with_one_warning_per_name(sqlite_uri: str, tmp_path: Path) -> None:
    tel = MLFlowTelemetry(tracking_uri=sqlite_uri, spool_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tel.log_metrics({"a": float("nan"), "b": jnp.float32(jnp.inf), "ok": 1.0}, step=0)
        tel.log_metrics({"a": float("-inf"), "b": float("nan"), "ok": 2.0}, step=1)
        assert tel.flush(timeout=60)
    msgs = [str(w.message) for w in caught if "is logged as is" in str(w.message)]
    assert len(msgs) == 2 and any("'a'" in m for m in msgs) and any("'b'" in m for m in msgs)
    tel.close()
    a = history(sqlite_uri, tel.run_id, "a")
    # the sqlite store keeps NaN but clamps infinities to the largest float64 (an MLflow choice)
    assert math.isnan(a[0][1]) and a[1][1] in (-math.inf, -sys.float_info.max)
    assert history(sqlite_uri, tel.run_id, "b")[0][1] in (math.inf, sys.float_info.max)


@pytest.mark.parametrize("metrics, error, culprit", [
    ({"weights": jnp.ones(3)}, ValueError, "'weights' must be a scalar, got an array of shape (3,)"),
    ({"image": np.zeros((2, 2))}, ValueError, "'image' must be a scalar, got an array of shape (2, 2)"),
    ({"name": "hello"}, TypeError, "'name' must be a real number"),
    ({"maybe": None}, TypeError, "'maybe'"),
    ({"c": np.complex64(1j)}, TypeError, "'c' must be a real number, got dtype complex64"),
    ({"bad{key}": 1.0}, ValueError, "'bad{key}'"),
    ({"x" * 251: 1.0}, ValueError, "at most 250 characters"),
])
def test_bad_metrics_fail_in_the_caller_naming_the_metric(sqlite_uri: str, tmp_path: Path, metrics: dict,
                                                          error: type, culprit: str) -> None:
    with MLFlowTelemetry(tracking_uri=sqlite_uri, spool_dir=tmp_path) as tel:
        with pytest.raises(error) as e:
            tel.log_metrics({"fine": 1.0, **metrics}, step=0)
        assert culprit in str(e.value)
    assert history(sqlite_uri, tel.run_id, "fine") == []  # nothing half-logged from the rejected call


def test_metric_inside_jit_is_a_clear_error(sqlite_uri: str, tmp_path: Path) -> None:
    with MLFlowTelemetry(tracking_uri=sqlite_uri, spool_dir=tmp_path) as tel:
        with pytest.raises(TypeError, match="'loss' is a JAX tracer"):
            jax.jit(lambda x: tel.log_metrics({"loss": x}, 0))(jnp.float32(1))


def test_params_long_values_changes_and_bad_keys(sqlite_uri: str, tmp_path: Path) -> None:
    tel = MLFlowTelemetry(tracking_uri=sqlite_uri, spool_dir=tmp_path)
    with pytest.warns(UserWarning, match="param 'prompt' has 7000 characters, over MLflow's limit of 6000"):
        tel.log_params({"prompt": "y" * 7000, "lr": 0.1})
    tel.log_params({"lr": 0.1})  # the same value again is fine
    with pytest.raises(ValueError, match="param 'lr' was already logged as '0.1'"):
        tel.log_params({"lr": 0.2})
    with pytest.raises(ValueError, match="'a b{'"):
        tel.log_params({"a b{": 1})
    tel.close()
    stored = MlflowClient(sqlite_uri).get_run(tel.run_id).data.params
    assert len(stored["prompt"]) == 6000 and stored["prompt"].endswith("...[truncated]")
    assert stored["lr"] == "0.1"
    with pytest.raises(RuntimeError, match="closed"):
        tel.log_metrics({"x": 1.0}, 0)


def test_server_outage_mid_run_and_at_close(fresh_mlflow_server, tmp_path: Path,
                                            capfd: pytest.CaptureFixture) -> None:
    """One outage, two runs: `tel` keeps logging through it and delivers after the restart; `tel2` is
    closed while the server is down, so its points (and the end of its run) are spooled, then uploaded."""
    uri = fresh_mlflow_server.uri
    tel = MLFlowTelemetry(tracking_uri=uri, experiment="outage", spool_dir=tmp_path, interval=0.2,
                          max_backoff=1.0, request_timeout=5.0, close_timeout=60.0)
    tel2 = MLFlowTelemetry(tracking_uri=uri, experiment="outage", spool_dir=tmp_path, interval=0.2,
                           max_backoff=0.5, request_timeout=2.0, close_timeout=1.0)
    tel.log_params({"phase": "one"})
    for t in range(0, 100):
        tel.log_metrics({"x": t}, step=t)
    assert tel.flush(timeout=60)
    fresh_mlflow_server.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(100, 200):  # queued while the server is down
            tel.log_metrics({"x": t}, step=t)
        tel2.log_params({"phase": "two"})
        for t in range(50):
            tel2.log_metrics({"y": t, "z": float("nan")}, step=t)
        assert not tel.flush(timeout=1.0)  # cannot complete while the server is down
        spool = tel2.close()  # down at close: spooled, with a one-line message
        assert spool is not None and spool.is_file()
        err = capfd.readouterr().err
        line = [ln for ln in err.splitlines() if str(spool) in ln]
        assert len(line) == 1 and "101 points" in line[0] and f"rlab upload {spool}" in line[0]
        fresh_mlflow_server.start()
        for t in range(200, 300):
            tel.log_metrics({"x": t}, step=t)
        assert tel.close() is None  # retried and delivered: nothing spooled
    assert history(uri, tel.run_id, "x") == [(t, float(t)) for t in range(300)]
    assert MlflowClient(uri).get_run(tel.run_id).info.status == "FINISHED"

    assert upload_main(["upload", str(spool)]) == 0
    assert not spool.exists() and spool.with_name(spool.name + ".uploaded").exists()
    assert history(uri, tel2.run_id, "y") == [(t, float(t)) for t in range(50)]
    assert len(history(uri, tel2.run_id, "z")) == 50
    run = MlflowClient(uri).get_run(tel2.run_id)
    assert run.data.params == {"phase": "two"} and run.info.status == "FINISHED"  # the end was spooled too


def test_upload_of_a_missing_or_bad_spool_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no spool file"):
        upload_spool(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"m": ["x", 1.0, 0, 0]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        upload_spool(bad)
    assert upload_main(["upload", str(tmp_path / "nope.jsonl")]) == 1


def test_rlab_upload_is_the_shell_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    "`rlab upload` (the console script) runs the same upload; a missing file is named, exit status 1."
    from researchlab.cli import main

    assert main(["upload", str(tmp_path / "nope.jsonl")]) == 1
    assert f"{tmp_path / 'nope.jsonl'}: upload_spool: no spool file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: usage on stderr, status 2
        main(["upload"])
    assert exc.value.code == 2 and "usage: rlab upload" in capsys.readouterr().err


def test_points_are_flushed_at_interpreter_exit(mlflow_server, tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys
        from researchlab.design.mlflow_telemetry import MLFlowTelemetry
        tel = MLFlowTelemetry(tracking_uri=sys.argv[1], experiment="atexit", spool_dir=sys.argv[2])
        print(tel.run_id, flush=True)
        for t in range(500):
            tel.log_metrics({"q": t}, step=t)
        # no close(): the interpreter exits right away
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script, mlflow_server.uri, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split()[0]
    assert history(mlflow_server.uri, run_id, "q") == [(t, float(t)) for t in range(500)]


def test_console_and_multi_telemetry(sqlite_uri: str, tmp_path: Path) -> None:
    buf = io.StringIO()
    console = ConsoleTelemetry(total=20, desc="train", file=buf, every=0.0)
    mlf = MLFlowTelemetry(tracking_uri=sqlite_uri, spool_dir=tmp_path)
    both = MultiTelemetry(console, mlf)
    assert isinstance(both, Telemetry)
    both.log_params(Cfg())
    for t in range(1, 21):
        both.log_metrics({"loss": jnp.float32(1.0 / t), "acc": t / 20}, step=t)
    both.close()
    text = buf.getvalue()
    assert "train" in text and "20/20" in text and "loss=0.05" in text and "acc=1" in text
    assert console.params["optim.lr"] == 1e-3
    assert len(history(sqlite_uri, mlf.run_id, "acc")) == 20
    with pytest.raises(ValueError, match="'w' must be a scalar"):
        ConsoleTelemetry(file=io.StringIO()).log_metrics({"w": np.ones(2)}, 0)


def test_multi_telemetry_closes_all_even_if_one_fails() -> None:
    closed = []

    class Failing(Telemetry):
        def log_metrics(self, metrics: dict, step: int) -> None: ...
        def log_params(self, params: dict) -> None: ...
        def close(self) -> None:
            raise OSError("disk full")

    class Recording(Telemetry):
        def log_metrics(self, metrics: dict, step: int) -> None: ...
        def log_params(self, params: dict) -> None: ...
        def close(self) -> None:
            closed.append(True)

    with pytest.raises(OSError, match="disk full"):
        MultiTelemetry(Failing(), Recording()).close()
    assert closed == [True]


def test_server_down_from_the_start_spills_beyond_max_pending_and_spools_everything(tmp_path: Path) -> None:
    from conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    run_id = "f" * 32  # an explicit run: nothing is asked of the server at construction
    tel = MLFlowTelemetry(run_id=run_id, tracking_uri=dead, spool_dir=tmp_path, interval=0.05, max_backoff=0.1,
                          request_timeout=1.0, close_timeout=0.5, max_pending=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(400):
            tel.log_metrics({"a": t}, step=t)
            if t % 100 == 99:
                tel.flush(timeout=0.3)  # gives the sender time to fail, back off and spill
        spool = tel.close()
    assert any("still unreachable and over 100 points" in str(w.message) for w in caught)
    assert any("are not all in MLflow after 0.3 s" in str(w.message) for w in caught)  # flush is bounded
    lines = [json.loads(x) for x in spool.read_text().splitlines()]
    steps = sorted(rec["m"][3] for rec in lines if "m" in rec)
    assert steps == list(range(400))  # every point exactly once, across spills and the final spool
    assert all(rec["run_id"] == run_id for rec in lines if "run_id" in rec)

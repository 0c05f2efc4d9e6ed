"""Benchmarks of the infrastructure (researchlab.design.mlflow_telemetry, .persist and .visualizer) (issue #3); baselines measured in the same run.

1. A loop of a ~3 ms jitted step logging 10 metrics per step to a real `mlflow server` through
   `MLFlowTelemetry`: loop wall time <= 1.05x the same loop without telemetry (target). For reference it
   also times plain `mlflow.log_metrics` per step.
2. `EquinoxPersister.save` of a 400 MB state (a crc32 per leaf) and its verified `load` (every checksum checked):
   throughput of each >= 0.8x one `write` + `fsync` of the same bytes.
3. Encoding 500 frames of 400x600 to H.264 mp4 with `VideoRecorder`: frames per second (no target; printed
   next to `imageio.v3.imwrite` of the same frames).

`python bench/bench_infra.py [--only telemetry,save,video] [--state-mb 400] [--steps 1000] [--frames 500]`.
Exits 1 when a target is missed. Timings on a shared machine are noisy: each figure is the best of
`--repeats` alternating runs.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)  # fork+exec of ffmpeg/server
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from researchlab.design.eqx_persist import EquinoxPersister  # noqa: E402
from researchlab.design.mlflow_telemetry import MLFlowTelemetry  # noqa: E402
from researchlab.design.visualizer import VideoRecorder  # noqa: E402


# ---- 1. telemetry overhead ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited; see {root / 'server.log'}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("mlflow server did not become healthy")


def _make_step(target_ms: float = 3.0) -> tuple[object, object, float]:
    "A jitted step `state -> (state, 10 metrics)` whose size is tuned to take about `target_ms`."
    def build(n: int):
        w = jax.random.normal(jax.random.key(0), (n, n)) / np.sqrt(n)

        @jax.jit
        def step(x):
            y = jnp.tanh(x @ w)
            metrics = {f"m{i}": y[i].mean() for i in range(10)}
            return y, metrics
        return step, jnp.ones((n, n))

    best = None
    for n in (256, 384, 512, 640, 768, 896, 1024):
        step, x = build(n)
        _loop(step, x, 5)  # compile
        ms = min(_loop(step, x, 100) for _ in range(3)) / 100 * 1e3  # measured as the benchmark runs it
        if best is None or abs(ms - target_ms) < abs(best[2] - target_ms):
            best = (step, x, ms)
        if ms > target_ms:
            break
    return best


def _loop(step, x, steps: int, log=None) -> float:
    t0 = time.perf_counter()
    for t in range(steps):
        x, metrics = step(x)
        if log is not None:
            log(metrics, t)
    jax.block_until_ready(x)
    return time.perf_counter() - t0


def bench_telemetry(steps: int, repeats: int) -> bool:
    import mlflow
    from mlflow import MlflowClient

    step, x, ms = _make_step()
    print(f"[telemetry] jitted step: {ms:.2f} ms; {steps} steps x 10 metrics per run; starting mlflow server ...")
    root = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    proc, uri = _start_server(root)
    try:
        client = MlflowClient(uri)
        exp = client.create_experiment("bench-infra")
        base, tel_loop, tel_total = [], [], []
        for r in range(repeats):
            base.append(_loop(step, x, steps))
            tel = MLFlowTelemetry(tracking_uri=uri, experiment="bench-infra", spool_dir=root)
            t0 = time.perf_counter()
            tel_loop.append(_loop(step, x, steps, tel.log_metrics))
            spooled = tel.close()
            tel_total.append(time.perf_counter() - t0)
            assert spooled is None, "points were spooled: the server did not take them"
            n = len(client.get_metric_history(tel.run_id, "m9"))
            assert n == steps, f"only {n} of {steps} points of m9 reached the server"
        # reference: synchronous mlflow.log_metrics per step (fewer steps: it is slow)
        ref_steps = max(50, steps // 10)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(experiment_id=exp):
            sync = _loop(step, x, ref_steps, lambda m, t: mlflow.log_metrics({k: float(v) for k, v in m.items()}, t))
        mlflow.set_tracking_uri(None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    b, t, tot = min(base), min(tel_loop), min(tel_total)
    ratio = t / b
    print(f"[telemetry] no telemetry: {b / steps * 1e3:.2f} ms/step; MLFlowTelemetry: {t / steps * 1e3:.2f} ms/step "
          f"(loop), {tot / steps * 1e3:.2f} ms/step including close(); plain mlflow.log_metrics: "
          f"{sync / ref_steps * 1e3:.2f} ms/step")
    ok = ratio <= 1.05
    print(f"[telemetry] loop wall time ratio {ratio:.3f}x (target <= 1.05x; with close {tot / b:.3f}x): "
          f"{'OK' if ok else 'MISSED'}")
    return ok


# ---- 2. checkpoint throughput -----------------------------------------------------------------
def bench_save(state_mb: int, repeats: int, directory: Path | None) -> bool:
    directory = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=directory))
    per = state_mb * (1 << 20) // 4 // 4  # four float32 leaves
    key = jax.random.key(0)
    state = {"params": jax.random.normal(key, (per,)), "opt": {"mu": jnp.ones(per), "nu": jnp.full(per, 2.0)},
             "buffer": jnp.arange(per, dtype=jnp.float32), "rng": key, "step": jnp.int32(3)}
    jax.block_until_ready(state)
    raw = b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(state)
                   if not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key))
    nbytes = len(raw)
    base, eqx_times, load_times = [], [], []
    p = EquinoxPersister()
    for _ in range(repeats):
        path = directory / "raw.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        base.append(time.perf_counter() - t0)
        path.unlink()
        t0 = time.perf_counter()
        out = p.save(state, None, 3, directory / "ckpt.eqx")
        eqx_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loaded, _, _ = p.load(out, state, None)  # reads every leaf and checks its crc32
        jax.block_until_ready(loaded)
        load_times.append(time.perf_counter() - t0)
        del loaded
        out.unlink()
    directory.rmdir()
    b, e, v = min(base), min(eqx_times), min(load_times)
    ok = True
    for name, t in (("EquinoxPersister.save", e), ("EquinoxPersister.load (verified)", v)):
        ratio = b / t  # throughput ratio: same bytes, so time_base / time
        print(f"[save] {nbytes / 2**20:.0f} MB: write+fsync {nbytes / b / 2**20:.0f} MB/s, {name} "
              f"{nbytes / t / 2**20:.0f} MB/s: ratio {ratio:.3f}x (target >= 0.8x): {'OK' if ratio >= 0.8 else 'MISSED'}")
        ok &= ratio >= 0.8
    return ok


# ---- 3. video encoding -------------------------------------------------------------------------
def bench_video(frames: int, repeats: int) -> bool:
    import imageio.v3 as iio
    import imageio_ffmpeg

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:400, 0:600]
    video = np.empty((frames, 400, 600, 3), np.uint8)
    for i in range(frames):  # a moving gradient with a little noise: compressible like a rendering
        video[i, ..., 0] = (xx + 3 * i) % 256
        video[i, ..., 1] = (yy + 2 * i) % 256
        video[i, ..., 2] = rng.integers(0, 16, (400, 600))
    directory = Path(tempfile.mkdtemp(prefix="bench-video-"))
    ours, ref = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rec = VideoRecorder(directory / "ours.mp4", fps=50)
        rec.extend(video)
        rec.close()
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        iio.imwrite(directory / "ref.mp4", video, fps=50, codec="libx264", macro_block_size=1)
        ref.append(time.perf_counter() - t0)
    n = imageio_ffmpeg.count_frames_and_secs(str(directory / "ours.mp4"))[0]
    assert n == frames, f"the mp4 has {n} frames, expected {frames}"
    for f in directory.iterdir():
        f.unlink()
    directory.rmdir()
    print(f"[video] {frames} frames 400x600 -> H.264 mp4: VideoRecorder {frames / min(ours):.0f} frames/s; "
          f"imageio.v3.imwrite {frames / min(ref):.0f} frames/s (no target)")
    return True


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="telemetry,save,video", help="comma-separated: telemetry,save,video")
    ap.add_argument("--state-mb", type=int, default=400, help="size of the saved state in MB")
    ap.add_argument("--steps", type=int, default=1000, help="loop steps per telemetry run")
    ap.add_argument("--frames", type=int, default=500, help="frames to encode")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per figure (best is kept)")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the checkpoint files (default: temp)")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    ok = True
    if "telemetry" in only:
        ok &= bench_telemetry(args.steps, args.repeats)
    if "save" in only:
        ok &= bench_save(args.state_mb, args.repeats, args.dir)
    if "video" in only:
        ok &= bench_video(args.frames, args.repeats)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

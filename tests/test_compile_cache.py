"""JAX's persistent compilation cache (researchlab.design.compile_cache): a second process loads the Loop's program
instead of compiling it, and its results are bit for bit those of an uncached run; `rlab demo` switches it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

JOB = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    import numpy as np
    from researchlab.design.compile_cache import enable_compile_cache
    if sys.argv[1] != "none":
        enable_compile_cache(sys.argv[1], min_compile_time_s=0)
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    from researchlab import ArrayDataProvider, Clock, Config, Loop, State

    class Cfg(Config):
        lr: float = 0.05

    class S(State):
        w: jax.Array
        clock: Clock

    def step(s, c, b):
        loss, g = jax.value_and_grad(lambda w: jnp.mean((b["x"] @ w - b["y"]) ** 2))(s.w)
        return S(w=s.w - c.lr * g, clock=s.clock), {"loss": loss}

    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}
    loop = Loop(Cfg(), S(w=jnp.zeros(3), clock=Clock()), step, ArrayDataProvider(data, batch_size=16),
                steps_per_call=8, log_every=1, progress=False)
    events.clear()  # count what the run does, not what building the State did
    loop.run(21)
    print(json.dumps({"w": np.asarray(loop.state.w).tolist(), "loss": loop.metric("loss")[1].tolist(),
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
""")


def _job(cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RLAB_COMPILE_CACHE"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", JOB, cache], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_program_and_gets_identical_metrics(tmp_path: Path) -> None:
    cache = tmp_path / "jax-cache"
    first, second, uncached = _job(str(cache)), _job(str(cache)), _job("none")
    assert first["misses"] >= 1 and first["hits"] == 0  # compiled, and written to the folder
    assert any(cache.iterdir())
    assert second["hits"] >= 1 and second["misses"] == 0  # every program of the run came from the folder
    assert uncached["hits"] == uncached["misses"] == 0  # no cache at all
    for run in (second, uncached):  # the loaded program computes exactly what a compiled one does
        np.testing.assert_array_equal(np.asarray(run["w"]), np.asarray(first["w"]))
        np.testing.assert_array_equal(np.asarray(run["loss"]), np.asarray(first["loss"]))
    assert len(first["loss"]) == 21


PROBE = textwrap.dedent("""
    import os, jax
    from jax.experimental.compilation_cache import compilation_cache
    from researchlab.cli import main
    from researchlab.design.compile_cache import compile_cache_dir
    main(["demo", "--help"])
    print("after --help:", compile_cache_dir())
    main(["demo", "total_steps=oops"])  # a bad value: the demo stops at once, after the cache was set up
    print("after demo:", compile_cache_dir())
    jax.config.update("jax_compilation_cache_dir", None); compilation_cache.reset_cache()
    os.environ["RLAB_COMPILE_CACHE"] = "off"
    main(["demo", "total_steps=oops"])
    print("with off:", compile_cache_dir())
""")


def test_rlab_demo_switches_the_cache_on_unless_told_off(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RLAB_COMPILE_CACHE"}
    env |= {"JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("after", "with"))]
    assert lines == ["after --help: None", f"after demo: {tmp_path / 'xdg' / 'researchlab' / 'jax'}",
                     "with off: None"], out.stdout[-2000:]

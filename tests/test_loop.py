"""Loop: resume bit-identity across processes, interrupts, stepping, scan fusion, bad inputs."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from researchlab import (
    ArrayDataProvider,
    Callback,
    CheckpointManager,
    Clock,
    Config,
    DataProvider,
    Loop,
    State,
    Telemetry,
    Visualizer,
    next_key,
)

HERE = Path(__file__).resolve().parent


# ---- a small but real training problem: MLP + Adam + a typed PRNG key + the Clock ----------------
class Cfg(Config):
    lr: float = 0.01
    hidden: int = 8
    noise: float = 0.05


class TState(State):
    params: dict
    opt: tuple
    rng: jax.Array
    clock: Clock


def _tx(cfg: Cfg) -> optax.GradientTransformation:
    return optax.adam(cfg.lr)


def make_state(cfg: Cfg, seed: int = 0) -> TState:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {"w1": 0.5 * jax.random.normal(k1, (3, cfg.hidden)), "b1": jnp.zeros(cfg.hidden),
              "w2": 0.5 * jax.random.normal(k2, (cfg.hidden, 1)), "b2": jnp.zeros(1)}
    return TState(params=params, opt=tuple(_tx(cfg).init(params)), rng=k3, clock=Clock())


def train_step(state: TState, cfg: Cfg, batch: Mapping[str, jax.Array]) -> tuple[TState, dict]:
    rng, sub = next_key(state.rng)
    x = batch["x"] + cfg.noise * jax.random.normal(sub, batch["x"].shape)

    def loss_fn(p: dict) -> jax.Array:
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean(((h @ p["w2"] + p["b2"][None, :])[:, 0] - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt = _tx(cfg).update(grads, state.opt, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TState(params=params, opt=tuple(opt), rng=rng, clock=state.clock.advance(episodes=1))
    return new, {"loss": loss, "gnorm": optax.tree.norm(grads)}


def make_data(n: int = 64) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": np.sin(x @ np.array([1.0, -2.0, 0.5], np.float32))}


def make_provider() -> ArrayDataProvider:
    return ArrayDataProvider(make_data(), batch_size=16, seed=3)


class HostProvider(DataProvider):
    "A provider that is not jittable: numpy batches chosen on the host from the clock step."

    def __init__(self, data: dict[str, np.ndarray], fail_at: int | None = None, exc: type = KeyboardInterrupt):
        self.data, self.fail_at, self.exc, self.calls = data, fail_at, exc, 0

    def get_batch(self, state: TState) -> dict[str, np.ndarray]:
        self.calls += 1
        step = int(state.clock.step)
        if self.fail_at is not None and step == self.fail_at:
            raise self.exc(f"provider stops at step {step}")
        i = (step * 16) % len(self.data["x"])
        return {k: v[i:i + 16] for k, v in self.data.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        raise StopIteration


class NoData(DataProvider):
    "A jittable provider for kernels that need no data."

    jittable = True

    def get_batch(self, state: object) -> None:
        return None

    def __next__(self) -> None:
        return None


class ListTelemetry(Telemetry):
    "Keeps every point in memory; counts flushes."

    def __init__(self) -> None:
        self.points: list[tuple[int, dict[str, float]]] = []
        self.params: list[object] = []
        self.flushes = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        assert all(isinstance(v, (int, float)) for v in metrics.values()), metrics
        self.points.append((int(step), dict(metrics)))

    def log_params(self, params: object) -> None:
        self.params.append(params)

    def flush(self) -> None:
        self.flushes += 1


def leaves_of(state: object) -> list[np.ndarray]:
    out = []
    for x in jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def assert_same(a: object, b: object) -> None:
    la, lb = leaves_of(a), leaves_of(b)
    assert len(la) == len(lb)
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        np.testing.assert_array_equal(x, y, err_msg=f"leaf {i}")


def new_loop(**kw: object) -> Loop:
    kw.setdefault("progress", False)
    provider = kw.pop("provider", None) or make_provider()
    config = kw.pop("config", None) or Cfg()  # a Config of its own gives a test a program no other test compiled
    return Loop(config, make_state(Cfg()), train_step, provider, **kw)


# ---- resume: bit-identical across processes ----------------------------------------------------
JOB = r"""
import os, sys
import numpy as np
mode, ckpt, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from test_loop import Cfg, Loop, leaves_of, make_provider, make_state, train_step
kw = dict(progress=False, log_every=5)
if mode == "straight":
    loop = Loop(Cfg(), make_state(Cfg()), train_step, make_provider(), **kw)
elif mode == "first":
    loop = Loop(Cfg(), make_state(Cfg()), train_step, make_provider(), checkpoint_dir=ckpt, save_every=7, **kw)
else:
    loop = Loop.resume(ckpt, train_step, make_provider(), like=make_state(Cfg()), config=Cfg, save_every=7, **kw)
    assert loop.step_count == n, loop.step_count
loop.run(n)
np.savez(out, *leaves_of(loop.state), steps=np.array([r["step"] for r in loop.history]),
         loss=np.array([r["loss"] for r in loop.history]))
"""


def _job(tmp_path: Path, *args: object) -> dict[str, np.ndarray]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / f"{args[0]}.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    r = subprocess.run([sys.executable, str(script), str(args[0]), str(tmp_path / "ckpt"), str(out), str(args[1])],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def test_resume_is_bit_identical_across_processes(tmp_path: Path) -> None:
    n = 23
    straight = _job(tmp_path, "straight", 2 * n)
    _job(tmp_path, "first", n)
    ckpts = [s for s, _ in CheckpointManager(tmp_path / "ckpt").checkpoints()]
    assert ckpts == [14, 21, 23]  # save_every=7 (keep 3) and the final checkpoint at the run's end
    resumed = _job(tmp_path, "resumed", n)
    leaf_keys = [k for k in straight if k.startswith("arr_")]
    assert len(leaf_keys) > 8
    for k in leaf_keys:
        assert straight[k].dtype == resumed[k].dtype
        np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)
    # the resumed run logged the same steps with the same values as the second half of the straight run
    second = straight["steps"] > n
    np.testing.assert_array_equal(resumed["steps"], straight["steps"][second])
    np.testing.assert_array_equal(resumed["loss"], straight["loss"][second])


def test_resume_in_process_continues_and_keeps_periodic_steps(tmp_path: Path) -> None:
    loop = new_loop(checkpoint_dir=tmp_path, save_every=4)
    loop.run(6)
    again = Loop.resume(tmp_path, train_step, make_provider(), like=make_state(Cfg()), config=Cfg(), progress=False,
                        save_every=4)
    assert again.step_count == 6 and again.config == Cfg()
    assert_same(again.state, loop.state)
    again.run(3)
    assert [s for s, _ in CheckpointManager(tmp_path).checkpoints()] == [6, 8, 9]  # keep=3: 4 was dropped


def test_resume_from_empty_or_missing_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*empty"):
        Loop.resume(empty, train_step, make_provider(), like=make_state(Cfg()), config=Cfg)
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        Loop.resume(tmp_path / "missing", train_step, make_provider(), like=make_state(Cfg()), config=Cfg)
    assert not (tmp_path / "missing").exists()


# ---- continuing, stepping, generators ------------------------------------------------------------
def test_run_continues_and_equals_one_long_run() -> None:
    a, b = new_loop(config=Cfg(noise=0.051)), new_loop(config=Cfg(noise=0.051))
    for n in (3, 0, 10, 7):
        s = a.run(n)
    b.run(20)
    assert int(s.clock.step) == a.step_count == 20
    assert int(s.clock.episode) == 20  # the kernel's own clock fields are kept
    assert_same(a.state, b.state)
    assert a._spec.traces == 1 and b._spec.traces == 0  # compiled once; b, built alike, reuses a's program


def test_step_and_steps_generator_stopped_early(tmp_path: Path) -> None:
    tel = ListTelemetry()
    loop = new_loop(telemetry=tel, log_every=2, checkpoint_dir=tmp_path)
    m = loop.step()
    assert set(m) == {"loss", "gnorm"} and all(isinstance(v, float) for v in m.values())
    seen = []
    for i, metrics in enumerate(loop.steps(100)):
        assert metrics["loss"].shape == ()
        seen.append(loop.step_count)
        if i == 4:
            break
    assert seen == [2, 3, 4, 5, 6] and loop.step_count == 6
    assert [s for s, _ in tel.points] == [2, 4, 6]  # fetched and flushed when the generator closed
    assert tel.flushes >= 2
    assert CheckpointManager(tmp_path).latest().name.startswith("ckpt_0000000006")
    ref = new_loop()
    ref.run(6)
    assert_same(loop.state, ref.state)
    loop.run(4)  # the loop is free again
    assert loop.step_count == 10


def test_open_generator_blocks_a_second_run() -> None:
    loop = new_loop()
    gen = loop.steps(5)
    next(gen)
    with pytest.raises(RuntimeError, match="already running"):
        loop.run(1)
    gen.close()
    loop.run(1)
    assert loop.step_count == 2


def test_metrics_logged_on_clock_multiples_and_history() -> None:
    tel = ListTelemetry()
    loop = new_loop(telemetry=tel, log_every=3)
    loop.run(10)
    loop.run(5)
    assert [s for s, _ in tel.points] == [3, 6, 9, 12, 15]
    assert [r["step"] for r in loop.history] == [3, 6, 9, 12, 15]
    assert tel.params == [{"lr": 0.01, "hidden": 8, "noise": 0.05}]  # the config, flat, logged once at the first run
    steps, loss = loop.metric("loss")
    assert steps.tolist() == [3, 6, 9, 12, 15] and loss.dtype == np.float64
    with pytest.raises(KeyError, match="'accuracy'"):
        loop.metric("accuracy")


def test_a_telemetry_written_to_the_contract_gets_a_flat_dict_of_plain_values() -> None:
    "`Telemetry.log_params(self, params: dict)`: the Loop flattens its Config (nested Configs to dotted keys)."
    class Optim(Config):
        lr: float = 3e-4
        betas: tuple[float, float] = (0.9, 0.999)

    class Nested(Config):
        seed: int = 3
        name: str = "reg"
        optim: Optim = Optim()

    class Strict(ListTelemetry):
        def log_params(self, params: dict) -> None:
            assert type(params) is dict, type(params)
            assert all(isinstance(k, str) for k in params), params
            assert all(isinstance(v, (int, float, str, bool, list)) for v in params.values()), params
            self.params.append(params)

    tel = Strict()
    loop = Loop(Nested(), make_state(Cfg()), lambda s, c, b: train_step(s, Cfg(), b), make_provider(),
                telemetry=tel, progress=False)
    loop.run(2)
    loop.run(2)
    assert tel.params == [{"seed": 3, "name": "reg", "optim.lr": 3e-4, "optim.betas": [0.9, 0.999]}]


def test_importing_the_loop_loads_no_ui_and_no_mlflow() -> None:
    "ipywidgets, matplotlib, IPython.display and mlflow are imported by the methods that need them, not by the module."
    code = ("import sys, types; pkg = types.ModuleType('researchlab'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['researchlab'] = pkg; import researchlab.design.loop, researchlab.design.orchestrator; "
            "print(sorted(m for m in ('ipywidgets', 'matplotlib', 'IPython.display', 'mlflow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(HERE.parent / "researchlab")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_clock_step_is_owned_by_the_loop_and_clock_accessor() -> None:
    class Inner(State):
        clock: Clock

    class Outer(State):
        x: jax.Array
        inner: Inner

    def no_tick(s: Outer, c: Cfg, b: object) -> tuple[Outer, dict]:
        return Outer(x=s.x + 1.0, inner=s.inner), {}

    def double_tick(s: Outer, c: Cfg, b: object) -> tuple[Outer, dict]:
        return Outer(x=s.x + 1.0, inner=Inner(clock=s.inner.clock.advance(steps=2))), {}

    for fn in (no_tick, double_tick):
        loop = Loop(Cfg(), Outer(x=jnp.zeros(()), inner=Inner(clock=Clock())), fn, NoData(),
                    clock=lambda s: s.inner.clock, progress=False)
        loop.run(5)
        assert int(loop.state.inner.clock.step) == loop.step_count == 5
    with pytest.raises(AttributeError, match="clock='clock'"):
        Loop(Cfg(), Outer(x=jnp.zeros(()), inner=Inner(clock=Clock())), no_tick, NoData())


def test_host_provider_and_weak_types_compile_once() -> None:
    class W(State):
        x: jax.Array
        y: float
        clock: Clock

    def fn(s: W, c: Cfg, b: Mapping) -> tuple[W, dict]:
        return W(x=s.x + jnp.mean(b["x"]), y=s.y * 0.5, clock=s.clock), {"x": s.x}

    provider = HostProvider(make_data())
    loop = Loop(Cfg(), W(x=jnp.asarray(0.0), y=1.0, clock=Clock()), fn, provider, progress=False)
    loop.run(6)
    assert provider.calls == 6 and loop._spec.traces == 1
    assert float(loop.state.y) == 0.5 ** 6
    # a host provider never enters the compiled call: another one (holding other arrays) shares the program
    other = HostProvider({k: v + 1.0 for k, v in make_data().items()})
    again = Loop(Cfg(), W(x=jnp.asarray(0.0), y=1.0, clock=Clock()), fn, other, progress=False)
    again.run(2)
    assert other.calls == 2 and again._spec.traces == 0


# ---- scan fusion -------------------------------------------------------------------------------
def test_scan_fusion_equals_unfused() -> None:
    tel_f, tel_u = ListTelemetry(), ListTelemetry()
    fused = new_loop(steps_per_call=4, log_every=3, telemetry=tel_f, config=Cfg(noise=0.052))
    unfused = new_loop(log_every=3, telemetry=tel_u, config=Cfg(noise=0.052))
    fused.run(10)  # 2 fused calls + 2 single steps
    fused.run(9)
    unfused.run(19)
    assert fused.step_count == 19 and fused._spec.traces == 1  # calls of 4, 4, 2, 4, 4, 1: one program
    assert_same(fused.state, unfused.state)
    assert [s for s, _ in tel_f.points] == [s for s, _ in tel_u.points] == [3, 6, 9, 12, 15, 18]
    for (_, a), (_, b) in zip(tel_f.points, tel_u.points):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_fused_periodic_work_happens_at_the_asked_steps(tmp_path: Path) -> None:
    "Fused calls are cut where a callback or a checkpoint is due: the work sees exactly the steps asked for."
    seen = []
    loop = new_loop(steps_per_call=5, callbacks=[Callback(4, lambda lp: seen.append(lp.step_count))],
                    checkpoint_dir=tmp_path, save_every=6, keep_checkpoints=None, config=Cfg(noise=0.053))
    loop.run(20)
    assert seen == [4, 8, 12, 16, 20]
    assert [s for s, _ in CheckpointManager(tmp_path).checkpoints()] == [6, 12, 18, 20]  # 20: the run's end
    assert loop._spec.traces == 1  # the cut calls (4, 2, 2, 4, ...) run the same program
    ref = new_loop(config=Cfg(noise=0.053))
    ref.run(20)
    assert_same(loop.state, ref.state)


# ---- compiling ahead -----------------------------------------------------------------------------
class _Compiles(logging.Handler):
    "Counts JAX's 'Finished XLA compilation of jit(NAME)' records (with jax.log_compiles on)."

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if m := re.search(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage()):
            self.names.append(m.group(1))


def _count_compiles(fn: object) -> list[str]:
    "The programs JAX compiles while `fn()` runs (named by function)."
    handler, logger = _Compiles(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            fn()
    finally:
        logger.removeHandler(handler)
    return handler.names


@pytest.mark.parametrize("k", [1, 4])
def test_precompile_compiles_the_program_run_calls(k: int) -> None:
    "After precompile(), the run compiles nothing more of its own, and trains exactly as a Loop that did not."
    ahead = new_loop(steps_per_call=k, config=Cfg(noise=0.054 + k / 1000))
    name = "_fused_call" if k > 1 else "_one_call"
    assert ahead.precompile() is None
    assert ahead._spec.traces == 1
    compiled = _count_compiles(lambda: ahead.run(10))
    assert name not in compiled, compiled  # the call found the program precompile() compiled
    assert ahead._spec.traces == 1
    ref = Loop(Cfg(noise=0.054 + k / 1000), make_state(Cfg()), train_step, make_provider(), progress=False)
    ref.run(10)
    assert_same(ahead.state, ref.state)


def test_precompile_in_background_then_run_waits() -> None:
    ahead = new_loop(steps_per_call=3, config=Cfg(noise=0.056))
    future = ahead.precompile(background=True)
    compiled = _count_compiles(lambda: ahead.run(7))  # waits for the thread first
    assert future.done() and future.exception() is None
    assert "_fused_call" not in compiled, compiled
    assert ahead._spec.traces == 1 and ahead.step_count == 7


def test_precompile_serves_another_loop_made_alike(tmp_path: Path) -> None:
    "What `rlab run` relies on: a Loop made alike (other telemetry and checkpoint folder) runs the program that "
    "another Loop's precompile(background=True) compiled, and trains as a Loop that compiled its own."
    ahead = new_loop(steps_per_call=4, config=Cfg(noise=0.058), checkpoint_dir=tmp_path / "a")
    ahead.precompile(background=True).result()
    run = new_loop(steps_per_call=4, config=Cfg(noise=0.058), checkpoint_dir=tmp_path / "b",
                   telemetry=ListTelemetry())
    compiled = _count_compiles(lambda: run.run(10))
    assert "_fused_call" not in compiled, compiled
    assert (ahead._spec.traces, run._spec.traces) == (1, 0)
    ref = new_loop(config=Cfg(noise=0.058))  # one step per call: a program of its own
    ref.run(10)
    assert_same(run.state, ref.state)
    assert [step for step, _ in run.telemetry.points] == [10]  # log_every=10
def test_precompile_errors() -> None:
    host = new_loop(provider=HostProvider(make_data()), config=Cfg(noise=0.057))
    with pytest.raises(ValueError, match=r"HostProvider.jittable is False.*precompile\(batch="):
        host.precompile()
    batch = host.provider.get_batch(host.state)
    host.precompile(batch=batch)
    assert host._spec.traces == 1
    host.run(2)
    assert host._spec.traces == 1

    def bad_step(state: TState, cfg: Cfg, batch: Mapping) -> tuple[TState, dict]:
        raise RuntimeError("kernel fails to trace")

    bad = Loop(Cfg(), make_state(Cfg()), bad_step, make_provider(), progress=False)
    bad.precompile(background=True)
    with pytest.raises(RuntimeError, match="kernel fails to trace"):  # the thread's error, raised by run
        bad.run(1)
    assert bad.step_count == 0
    with pytest.raises(RuntimeError, match="kernel fails to trace"):  # the Loop is free again: no 'already running'
        bad.run(1)


# ---- interrupts --------------------------------------------------------------------------------
def test_keyboard_interrupt_from_callback_stops_after_the_step(tmp_path: Path) -> None:
    tel = ListTelemetry()

    def boom(lp: Loop) -> None:
        if lp.step_count == 6:
            raise KeyboardInterrupt

    loop = new_loop(callbacks=[(3, boom)], telemetry=tel, log_every=2, checkpoint_dir=tmp_path)
    state = loop.run(100)
    assert loop.interrupted and loop.step_count == 6 and int(state.clock.step) == 6
    assert [s for s, _ in tel.points] == [2, 4, 6] and tel.flushes == 1
    assert [s for s, _ in CheckpointManager(tmp_path).checkpoints()] == [6]  # final checkpoint
    loop.callbacks.clear()
    loop.run(4)
    ref = new_loop()
    ref.run(10)
    assert_same(loop.state, ref.state)


def test_keyboard_interrupt_from_provider_keeps_last_completed_step() -> None:
    provider = HostProvider(make_data(), fail_at=4)
    loop = new_loop(provider=provider)
    loop.run(10)
    assert loop.interrupted and loop.step_count == 4
    provider.fail_at = None
    loop.run(3)
    ref = new_loop(provider=HostProvider(make_data()))
    ref.run(7)
    assert_same(loop.state, ref.state)


def test_sigint_stops_after_current_step() -> None:
    "The Jupyter stop button sends SIGINT: the run finishes the step it is in and returns."
    def press_stop(lp: Loop) -> None:
        if lp.step_count == 5:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    loop = new_loop(callbacks=[(1, press_stop)])
    loop.run(50)
    assert loop.interrupted and loop.step_count in (5, 6)  # the signal is handled at the next bytecode
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):  # outside run, SIGINT is a normal KeyboardInterrupt again
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)


def test_sigterm_stops_after_current_step_flushes_and_checkpoints(tmp_path: Path) -> None:
    "A scheduler's SIGTERM is the first Ctrl-C: finish the step, flush, checkpoint; the script's handler comes back."
    received = []

    def scripts_own(signum: int, frame: object) -> None:
        received.append(signum)

    before = signal.signal(signal.SIGTERM, scripts_own)

    def preempted(lp: Loop) -> None:
        if lp.step_count == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        tel = ListTelemetry()
        loop = new_loop(callbacks=[(1, preempted)], telemetry=tel, log_every=1, checkpoint_dir=tmp_path / "ckpt",
                        save_every=100)
        loop.run(50)
        assert loop.interrupted and loop.stop_signal == signal.SIGTERM and loop.step_count in (5, 6)
        assert received == []  # the Loop handled it, not the handler that was there before
        assert [p[0] for p in tel.points] == list(range(1, loop.step_count + 1)) and tel.flushes >= 1
        assert loop.checkpoints.latest().name == f"ckpt_{loop.step_count:010d}.eqx"
        assert signal.getsignal(signal.SIGTERM) is scripts_own
        os.kill(os.getpid(), signal.SIGTERM)  # outside run, the script's handler gets it again
        time.sleep(0.1)
        assert received == [signal.SIGTERM]
        loop.run(2)
        assert not loop.interrupted and loop.stop_signal is None
    finally:
        signal.signal(signal.SIGTERM, before)


def test_failing_telemetry_releases_the_loop() -> None:
    class Refuses(ListTelemetry):
        def log_params(self, params: object) -> None:
            raise ValueError("param 'lr' was already logged as '0.1'")

    loop = new_loop(telemetry=Refuses())
    with pytest.raises(ValueError, match="already logged"):
        loop.run(2)
    loop.log_config = False
    loop.run(2)
    assert loop.step_count == 2


def test_other_errors_propagate_and_release_the_loop() -> None:
    provider = HostProvider(make_data(), fail_at=3, exc=RuntimeError)
    loop = new_loop(provider=provider)
    with pytest.raises(RuntimeError, match="provider stops at step 3"):
        loop.run(10)
    assert loop.step_count == 3
    provider.fail_at = None
    loop.run(1)
    assert loop.step_count == 4


# ---- bad input ----------------------------------------------------------------------------------
def _unchanged(loop: Loop, ref: list[np.ndarray], step: int) -> None:
    assert loop.step_count == step
    for x, y in zip(leaves_of(loop.state), ref):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kernel, exc, match", [
    (lambda s, c, b: s, TypeError, r"must return a pair \(new_state, metrics\); it returned a TState"),
    (lambda s, c, b: (s, {"loss": 1.0}, 3), TypeError, "returned a tuple of 3"),
    (lambda s, c, b: (s, [1.0]), TypeError, "second element is a list"),
    (lambda s, c, b: (s, {"loss": jnp.ones(3)}), ValueError, r"metric 'loss' has shape \(3,\)"),
    (lambda s, c, b: (s, {"name": "x"}), TypeError, "metric 'name' is a str"),
    (lambda s, c, b: (s, {3: 1.0}), TypeError, "got 3"),
    (lambda s, c, b: ({"params": s.params}, {}), TypeError, "returned a dict where the State is a TState"),
    (lambda s, c, b: (TState(params={**s.params, "w3": s.params["b2"]}, opt=s.opt, rng=s.rng, clock=s.clock), {}),
     TypeError, r"extra leaf state.params\['w3'\]"),
    (lambda s, c, b: (TState(params={"w1": s.params["w1"]}, opt=s.opt, rng=s.rng, clock=s.clock), {}),
     TypeError, r"state.params\['b1'\] is missing"),
    (lambda s, c, b: (TState(params={**s.params, "b1": jnp.zeros(9)}, opt=s.opt, rng=s.rng, clock=s.clock), {}),
     TypeError, r"state.params\['b1'\] from float32\[8\] to float32\[9\]"),
    (lambda s, c, b: (TState(params={**s.params, "b1": s.params["b1"].astype(jnp.bfloat16)}, opt=s.opt, rng=s.rng,
                             clock=s.clock), {}), TypeError, r"state.params\['b1'\] from float32\[8\] to bfloat16\[8\]"),
])
def test_bad_kernel_output_is_named_and_state_unchanged(kernel: object, exc: type, match: str) -> None:
    at_2 = eqx.tree_at(lambda s: s.clock.step, make_state(Cfg()), jnp.asarray(2, jnp.int32))
    loop = Loop(Cfg(), at_2, kernel, make_provider(), progress=False)
    ref = leaves_of(loop.state)
    with pytest.raises(exc, match=match):
        loop.run(3)
    _unchanged(loop, ref, 2)
    with pytest.raises(exc, match=match):
        loop.step()
    _unchanged(loop, ref, 2)


def test_structure_change_only_on_some_steps_is_caught_by_retrace() -> None:
    "A host provider whose batch shape changes makes JAX retrace; the new trace is checked too."
    class Growing(HostProvider):
        def get_batch(self, state: TState) -> dict[str, np.ndarray]:
            b = super().get_batch(state)
            return b if int(state.clock.step) < 2 else {k: v[:8] for k, v in b.items()}

    def kernel(s: TState, c: Cfg, b: Mapping) -> tuple[TState, dict]:
        new, m = train_step(s, c, b)
        if b["x"].shape[0] == 8:
            new = TState(params={**new.params, "b2": jnp.zeros(2)}, opt=new.opt, rng=new.rng, clock=new.clock)
        return new, m

    loop = Loop(Cfg(), make_state(Cfg()), kernel, Growing(make_data()), progress=False)
    with pytest.raises(TypeError, match=r"state.params\['b2'\] from float32\[1\] to float32\[2\]"):
        loop.run(5)
    assert loop.step_count == 2


@pytest.fixture(scope="module")
def shared_loop() -> Loop:
    "One compiled Loop for tests that only need a working one."
    return new_loop()


@pytest.mark.parametrize("n, exc, match", [
    (-1, ValueError, "num_steps must be >= 0, got -1"),
    (2.0, TypeError, "must be an int, got float 2.0"),
    ("3", TypeError, "got str '3'"),
    (True, TypeError, "got bool True"),
    (None, TypeError, "got NoneType"),
])
def test_bad_num_steps(shared_loop: Loop, n: object, exc: type, match: str) -> None:
    loop = shared_loop
    loop.run(1)
    ref, step = leaves_of(loop.state), loop.step_count
    with pytest.raises(exc, match=match):
        loop.run(n)
    with pytest.raises(exc, match=match):
        list(loop.steps(n))
    _unchanged(loop, ref, step)
    loop.run(np.int64(2))
    assert loop.step_count == step + 2


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    s, p = make_state(Cfg()), make_provider()
    with pytest.raises(ValueError, match="steps_per_call=4 .* HostProvider.jittable is False"):
        Loop(Cfg(), s, train_step, HostProvider(make_data()), steps_per_call=4)
    with pytest.raises(ValueError, match="steps_per_call must be an int >= 1, got 0"):
        Loop(Cfg(), s, train_step, p, steps_per_call=0)
    with pytest.raises(ValueError, match="save_every is set but there is no checkpoint_dir"):
        Loop(Cfg(), s, train_step, p, save_every=5)
    with pytest.raises(ValueError, match="log_every must be a positive int"):
        Loop(Cfg(), s, train_step, p, log_every=-2)
    with pytest.raises(ValueError, match="render_every is set but no visualizer"):
        Loop(Cfg(), s, train_step, p, render_every=5)
    with pytest.raises(TypeError, match="step_fn must be callable"):
        Loop(Cfg(), s, "train", p)
    with pytest.raises(TypeError, match="data_provider must have get_batch"):
        Loop(Cfg(), s, train_step, [1, 2])

    for every in (0, -3, 2.5, "5", True, None):
        with pytest.raises((TypeError, ValueError), match=f"Callback: every must be a positive int .*got {every!r}"):
            Callback(every, print)
    with pytest.raises(ValueError, match="Callback: every must be a positive int .*got 0"):
        Loop(Cfg(), s, train_step, p, callbacks=[(0, print)])
    with pytest.raises(TypeError, match="Callback: fn must be callable .*got str"):
        Callback(5, "print")

    done = new_loop(checkpoint_dir=tmp_path / "run")
    done.run(3)
    with pytest.raises(ValueError, match="already holds checkpoints up to step 3, past this State's step 0"):
        Loop(Cfg(), s, train_step, p, checkpoint_dir=tmp_path / "run")



# ---- donation, rendering, widget ------------------------------------------------------------------
def test_donation_is_opt_in() -> None:
    init = make_state(Cfg())
    loop = Loop(Cfg(), init, train_step, make_provider(), progress=False)
    before = loop.state
    loop.run(3)
    np.asarray(before.params["w1"])  # still alive: nothing donated by default
    donating = Loop(Cfg(), init, train_step, make_provider(), donate=True, progress=False)
    donating.run(3)
    np.asarray(init.params["w1"])  # the caller's initial State was copied, not donated
    assert_same(donating.state, loop.state)


class Dots(Visualizer):
    def draw(self, state: TState) -> np.ndarray:
        frame = np.zeros((8, 8, 3), np.uint8)
        frame[0, 0, 0] = int(state.clock.step)
        return frame

    def close(self) -> None:
        pass


def test_render_every_hands_the_state_to_the_visualizer() -> None:
    frames = []

    class Recording(Dots):
        def _record(self, frame: np.ndarray) -> None:
            frames.append(int(frame[0, 0, 0]))

    loop = new_loop(visualizer=Recording(record=True), render_every=4)
    loop.run(10)
    assert frames == [4, 8]


def test_widget_buttons_drive_the_same_loop() -> None:
    loop = new_loop(log_every=1)
    w = loop.widget(metrics=["loss"], num_steps=30, plot_every=0.0)
    step_b, n_box, run_b, stop_b, counter = w.children[0].children
    status, plot = w.children[1], w.children[2]
    for widget, cls in [(step_b, "step-button"), (run_b, "run-button"), (stop_b, "stop-button"),
                        (counter, "step-counter")]:
        assert cls in widget._dom_classes
    step_b.click()
    assert loop.step_count == 1 and counter.value == 1 and "loss=" in status.value
    assert plot.children[1].data[0].x[-1] == 1  # the step's point reached the figure
    run_b.click()
    deadline = time.monotonic() + 60
    while (loop._busy.locked() or run_b.disabled) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop.step_count == 31 and counter.value == 31 and "done at step 31" in status.value
    # Stop: a slow callback keeps the run going long enough to press it
    loop.callbacks.append(Callback(1, lambda lp: time.sleep(0.02)))
    n_box.value = 10_000
    run_b.click()
    time.sleep(0.3)
    stop_b.click()
    deadline = time.monotonic() + 60
    while (loop._busy.locked() or run_b.disabled) and time.monotonic() < deadline:  # the buttons come back last
        time.sleep(0.05)
    assert 31 < loop.step_count < 10_031 and "paused" in status.value
    assert counter.value == loop.step_count and not run_b.disabled and stop_b.disabled


def _wait_idle(loop: Loop, run_b: object, timeout: float = 60) -> None:
    "Wait until the widget's worker is done: the Loop released and the buttons back."
    deadline = time.monotonic() + timeout
    while (loop._busy.locked() or run_b.disabled) and time.monotonic() < deadline:
        time.sleep(0.05)


class ClosesLikeMLflow(ListTelemetry):
    "A telemetry that refuses points after close() (as MLFlowTelemetry does) and has no `closed` attribute."

    def __init__(self) -> None:
        super().__init__()
        self.shut = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.shut:
            raise RuntimeError("ClosesLikeMLflow is closed; create a new one to log more")
        super().log_metrics(metrics, step)

    def close(self) -> None:
        self.shut = True


@pytest.mark.parametrize("case", ["telemetry closed behind the Loop", "unknown metric to plot", "kernel error"])
def test_widget_error_in_the_worker_shows_and_restores_the_buttons(case: str, tmp_path: Path) -> None:
    "An exception in Run N's thread, wherever it happens, ends on the status line with the buttons back."
    tel = ClosesLikeMLflow()
    provider = HostProvider(make_data(), fail_at=3, exc=RuntimeError) if case == "kernel error" else None
    loop = new_loop(log_every=1, telemetry=tel, provider=provider, checkpoint_dir=tmp_path / "ckpt")
    w = loop.widget(metrics=["nope"] if case == "unknown metric to plot" else ["loss"], num_steps=20, plot_every=0.0)
    step_b, n_box, run_b, stop_b, counter = w.children[0].children
    status = w.children[1]
    if case == "telemetry closed behind the Loop":  # as the tutorial does: telemetry.close(), then the widget
        loop.step()
        tel.close()
    run_b.click()
    _wait_idle(loop, run_b, timeout=30)
    assert not loop._busy.locked() and not run_b.disabled and not step_b.disabled and stop_b.disabled, status.value
    expected = {"telemetry closed behind the Loop": "could not log the metrics of step 2 (RuntimeError: "
                                                     "ClosesLikeMLflow is closed",
                "unknown metric to plot": "KeyError: \"Loop.metric: no metric 'nope'",
                "kernel error": "RuntimeError: provider stops at step 3"}[case]
    assert status.value.startswith("error: ") and expected in status.value, status.value
    assert counter.value == loop.step_count
    if case == "telemetry closed behind the Loop":  # the run stops at the failure; its steps stay in history
        assert loop.step_count == 3 and [r["step"] for r in loop.history] == [1, 2, 3]
        loop.telemetry = None  # the fix the message gives: the widget runs again
        run_b.click()
        _wait_idle(loop, run_b)
        assert "done at step 23" in status.value, status.value
        assert loop.checkpoints.latest().name == "ckpt_0000000023.eqx"


def test_widget_with_a_closed_mlflow_telemetry_says_so(sqlite_uri: str) -> None:
    "The tutorial's case: the MLflow telemetry is closed, then the widget's Run N is pressed."
    from researchlab import MLFlowTelemetry

    tel = MLFlowTelemetry(tracking_uri=sqlite_uri, experiment="widget-test", interval=0.1)
    loop = new_loop(telemetry=tel, log_every=1)
    loop.run(2)
    tel.close()
    w = loop.widget(metrics=["loss"], num_steps=10, plot_every=0.0)
    run_b, status = w.children[0].children[2], w.children[1]
    run_b.click()
    _wait_idle(loop, run_b, timeout=30)
    # refused before anything starts (MLFlowTelemetry.closed), with the buttons left usable
    assert not run_b.disabled and "telemetry MLFlowTelemetry is closed" in status.value, status.value


def test_a_loop_whose_telemetry_is_closed_says_so_before_running() -> None:
    class Closed(ListTelemetry):
        closed = True

    loop = new_loop(telemetry=Closed())
    with pytest.raises(RuntimeError, match=r"Loop.run: this Loop's telemetry Closed is closed"):
        loop.run(3)
    assert loop.step_count == 0 and not loop._busy.locked()
    w = loop.widget(metrics=["loss"], num_steps=5)
    run_b, status = w.children[0].children[2], w.children[1]
    run_b.click()  # refused in the click handler: nothing starts
    assert "telemetry Closed is closed" in status.value and not run_b.disabled and loop.step_count == 0

    open_one = ListTelemetry()
    loop = new_loop(telemetry=open_one, log_every=1)
    loop.run(2)
    loop.close()
    with pytest.raises(RuntimeError, match=r"ListTelemetry \(closed by loop.close\(\)\) is closed"):
        loop.run(1)
    loop.telemetry = ListTelemetry()
    loop.run(1)
    assert loop.step_count == 3


# ---- with the real MLflow telemetry -------------------------------------------------------------
def test_loop_metrics_and_config_reach_mlflow(sqlite_uri: str) -> None:
    from mlflow import MlflowClient

    from researchlab import MLFlowTelemetry

    tel = MLFlowTelemetry(tracking_uri=sqlite_uri, experiment="loop-test", interval=0.1)
    loop = new_loop(telemetry=tel, log_every=5)
    loop.run(12)
    loop.run(8)  # the end of each run flushes: everything logged so far is in MLflow
    client = MlflowClient(tracking_uri=sqlite_uri)
    history = client.get_metric_history(tel.run_id, "loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    np.testing.assert_allclose([m.value for m in history], loop.metric("loss")[1], rtol=1e-6)
    assert client.get_run(tel.run_id).data.params["lr"] == "0.01"
    loop.close()


def test_config_and_kernel_are_fixed_after_construction() -> None:
    loop = new_loop()
    with pytest.raises(AttributeError):
        loop.config = Cfg(lr=1.0)
    with pytest.raises(AttributeError):
        loop.step_fn = train_step
    assert loop.config == Cfg() and loop.step_fn is train_step


# ---- a State with non-array leaves (an eqx.nn.MLP holds its activation functions) ------------------
class MLPState(State):
    model: eqx.nn.MLP
    opt: tuple
    tag: str
    clock: Clock


def mlp_step(state: MLPState, cfg: Cfg, batch: Mapping[str, jax.Array]) -> tuple[MLPState, dict]:
    def loss_fn(model: eqx.nn.MLP) -> jax.Array:
        return jnp.mean((jax.vmap(model)(batch["x"])[:, 0] - batch["y"]) ** 2)

    params, static = eqx.partition(state.model, eqx.is_array)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static)))(params)
    updates, opt = _tx(cfg).update(grads, state.opt, params)
    model = eqx.combine(optax.apply_updates(params, updates), static)
    return MLPState(model=model, opt=tuple(opt), tag=state.tag, clock=state.clock), {"loss": loss}


def make_mlp_state() -> MLPState:
    model = eqx.nn.MLP(3, 1, 8, 2, key=jax.random.key(0))
    return MLPState(model=model, opt=tuple(_tx(Cfg()).init(eqx.filter(model, eqx.is_array))), tag="mlp",
                    clock=Clock())


def test_state_with_functions_and_strings_runs_saves_and_resumes(tmp_path: Path) -> None:
    loop = Loop(Cfg(), make_mlp_state(), mlp_step, make_provider(), progress=False, checkpoint_dir=tmp_path,
                log_every=4)
    loop.run(8)
    assert loop.state.tag == "mlp" and loop.state.model.activation is jax.nn.relu
    assert loop.history[-1]["loss"] < loop.history[0]["loss"]
    again = Loop.resume(tmp_path, mlp_step, make_provider(), like=make_mlp_state(), config=Cfg, progress=False)
    again.run(4)
    loop.run(4)
    assert_same(again.state, loop.state)

    def retag(s: MLPState, c: Cfg, b: Mapping) -> tuple[MLPState, dict]:
        new, m = mlp_step(s, c, b)
        return MLPState(model=new.model, opt=new.opt, tag="other", clock=new.clock), m

    bad = Loop(Cfg(), loop.state, retag, make_provider(), progress=False)
    with pytest.raises(TypeError, match="changed state.tag, a non-array leaf \\('mlp' -> 'other'\\)"):
        bad.run(1)
    assert bad.step_count == 12


# ---- no per-step transfers ------------------------------------------------------------------------
def test_no_host_transfer_per_step_and_one_fetch_per_log_period(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = new_loop(log_every=None)
    loop.run(2)  # compile outside the guard
    with jax.transfer_guard("disallow_explicit"):  # any host->device transfer in a step would raise here
        loop.run(20)
    assert loop.step_count == 22

    fetched = []
    real_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetched.append(x) or real_get(x))
    logging = new_loop(log_every=10)
    logging.run(100)
    assert len(fetched) <= 10  # metrics of 10 logged steps, fetched in batches, never once per step
    assert sum(len(batch) for batch in fetched) == 10 and len(logging.history) == 10


# ---- history, interrupt messages -------------------------------------------------------------------
def test_history_is_capped_and_the_telemetry_gets_every_record() -> None:
    tel = ListTelemetry()
    loop = new_loop(log_every=1, telemetry=tel, history_max=8)
    loop.run(30)
    steps = [r["step"] for r in loop.history]
    assert len(steps) <= 8 and steps[-1] == 30 and steps == sorted(steps)
    assert steps[0] < 10  # thinned, not truncated: the start of the run is still there
    assert [s for s, _ in tel.points] == list(range(1, 31))
    with pytest.raises(ValueError, match="history_max must be an int >= 2 .* got 1"):
        new_loop(history_max=1)


def test_interrupt_messages_name_the_same_step(capsys: pytest.CaptureFixture) -> None:
    "The signal arrives while a step is in progress (inside get_batch): both messages name the step it ends at."
    class PressStop(HostProvider):
        def get_batch(self, state: TState) -> dict[str, np.ndarray]:
            if int(state.clock.step) == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return super().get_batch(state)

    loop = new_loop(provider=PressStop(make_data()), progress=True)
    loop.run(50)
    out = capsys.readouterr().out
    announced = re.findall(r"^Loop: interrupt received; stopping at step (\d+), when the step in progress ends", out,
                           re.M)
    stopped = re.findall(r"^Loop: stopped at step (\d+); run\(\.\.\.\) continues from here$", out, re.M)
    assert announced == stopped == [str(loop.step_count)] == ["7"], out

"""EquinoxPersister, OrbaxPersister and CheckpointManager: round trips, structure checks, atomicity, kill -9."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _configs import Cfg, Optim

import researchlab
from researchlab.design.core import Clock, Config, State
from researchlab.design.eqx_persist import EquinoxPersister
from researchlab.design.orbax_persist import OrbaxPersister
from researchlab.design.persist import CheckpointManager


class Layer(eqx.Module):
    w: jax.Array
    b: jax.Array


class Agent(State):
    clock: Clock
    layers: list
    rng: jax.Array
    raw_key: jax.Array
    count: int
    scale: float
    host: np.ndarray


def make_agent(seed: int = 0, width: int = 3) -> Agent:
    k = jax.random.key(seed)
    return Agent(
        clock=Clock().advance(seed, episodes=2),
        layers=[Layer(jax.random.normal(k, (width, 2)), jnp.full((2,), seed, jnp.bfloat16)),
                Layer(jnp.arange(4, dtype=jnp.int8).reshape(2, 2), jnp.zeros((), jnp.uint16))],
        rng=jax.random.split(k, 3),
        raw_key=jax.random.PRNGKey(seed),
        count=seed + 1,
        scale=0.5 * seed,
        host=np.arange(3, dtype=np.float64) * seed,
    )


def assert_trees_equal(a: object, b: object) -> None:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert y.dtype == x.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array)), (type(x), type(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


PERSISTERS = [EquinoxPersister, OrbaxPersister]


@pytest.mark.parametrize("persister_cls", PERSISTERS)
def test_round_trip_keeps_leaves_step_config_and_typed_keys(tmp_path: Path, persister_cls: type) -> None:
    p = persister_cls()
    agent, cfg = make_agent(7), Cfg(seed=7, optim=Optim(lr=0.25))
    path = p.save(agent, cfg, 1234, tmp_path / f"ckpt{p.suffix}")
    state, config, step = p.load(path, make_agent(0), Cfg)
    assert step == 1234 and config == cfg
    assert_trees_equal(state, agent)
    # a Config instance works as the config structure too, and a jitted function accepts the loaded state
    _, config2, _ = p.load(path, make_agent(0), Cfg())
    assert config2 == cfg
    assert float(jax.jit(lambda s: s.layers[0].w.sum())(state)) == pytest.approx(float(agent.layers[0].w.sum()))


@pytest.mark.parametrize("persister_cls", PERSISTERS)
@pytest.mark.parametrize("change, culprit", [
    (lambda a: eqx.tree_at(lambda s: s.layers[0].w, a, jnp.zeros((4, 2))), "layers[0].w shape=[3, 2]"),
    (lambda a: eqx.tree_at(lambda s: s.layers[1].w, a, a.layers[1].w.astype(jnp.int32)), "layers[1].w shape=[2, 2] dtype=int8"),
    (lambda a: eqx.tree_at(lambda s: s.rng, a, jax.random.split(jax.random.key(0, impl="rbg"), 3)), ".rng"),
    (lambda a: eqx.tree_at(lambda s: s.layers, a, a.layers[:1]), "layers[1].w"),
    (lambda a: eqx.tree_at(lambda s: s.layers, a, a.layers + [Layer(jnp.zeros(1), jnp.zeros(1))]), "layers[2].w"),
    (lambda a: eqx.tree_at(lambda s: s.count, a, 1.5), ".count"),
])
def test_loading_into_a_different_structure_names_the_first_differing_leaf(
        tmp_path: Path, persister_cls: type, change: object, culprit: str) -> None:
    p = persister_cls()
    path = p.save(make_agent(1), Cfg(), 5, tmp_path / f"ckpt{p.suffix}")
    with pytest.raises(ValueError, match="does not match state_structure") as e:
        p.load(path, change(make_agent(0)), Cfg)
    assert culprit in str(e.value)


@pytest.mark.parametrize("persister_cls", PERSISTERS)
def test_stored_config_that_does_not_validate_names_the_class(tmp_path: Path, persister_cls: type) -> None:
    class Other(Config):
        hidden: int

    p = persister_cls()
    path = p.save(make_agent(1), Cfg(), 5, tmp_path / f"ckpt{p.suffix}")
    with pytest.raises(ValueError, match="does not validate as Other"):
        p.load(path, make_agent(0), Other)


def test_save_leaves_no_file_when_it_fails(tmp_path: Path) -> None:
    class Boom(State):
        x: jax.Array
        y: object

    # the second leaf is an object array, which .npy cannot store without pickle: the save fails midway
    bad = Boom(jnp.ones(3), np.array(["text", {"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        EquinoxPersister().save(bad, Cfg(), 1, tmp_path / "ckpt.eqx")
    assert list(tmp_path.iterdir()) == []
    # an existing checkpoint is not touched by a failed overwrite
    good = EquinoxPersister().save(make_agent(1), Cfg(), 1, tmp_path / "ckpt.eqx")
    before = good.read_bytes()
    with pytest.raises(ValueError):
        EquinoxPersister().save(bad, Cfg(), 2, good)
    assert good.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.eqx"]


def test_save_into_a_missing_folder_and_load_of_garbage_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        EquinoxPersister().save(make_agent(), Cfg(), 0, tmp_path / "nowhere" / "c.eqx")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OrbaxPersister().save(make_agent(), Cfg(), 0, tmp_path / "nowhere" / "c.orbax")
    junk = tmp_path / "junk.eqx"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.eqx"):
        EquinoxPersister().load(junk, make_agent(), Cfg)
    with pytest.raises(TypeError, match="config must be a researchlab Config"):
        EquinoxPersister().save(make_agent(), {"lr": 1}, 0, tmp_path / "c.eqx")


@pytest.mark.parametrize("persister_cls", PERSISTERS)
def test_manager_keeps_last_n_and_restores_latest(tmp_path: Path, persister_cls: type) -> None:
    mgr = CheckpointManager(tmp_path / "ckpts", persister_cls(), keep=2)
    for step in (10, 20, 30, 40):
        path = mgr.save(make_agent(step), Cfg(seed=step), step)
        assert path == mgr.path_for(step)
    assert [s for s, _ in mgr.checkpoints()] == [30, 40]
    assert mgr.latest() == mgr.path_for(40)
    state, cfg, step = mgr.restore(make_agent(0), Cfg)
    assert (step, cfg.seed, int(state.clock.step)) == (40, 40, 40)
    state, _, step = mgr.restore(make_agent(0), Cfg, path=mgr.path_for(30))
    assert (step, int(state.clock.step)) == (30, 30)


def test_manager_ignores_temp_partial_and_foreign_files(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=None)
    mgr.save(make_agent(3), Cfg(), 3)
    good = mgr.path_for(3).read_bytes()
    (tmp_path / ".ckpt_0000000009.eqx.abc.tmp").write_bytes(good)           # a temp file of a killed save
    (tmp_path / "ckpt_0000000008.eqx").write_bytes(good[: len(good) // 2])  # truncated copy
    (tmp_path / "ckpt_0000000007.orbax").mkdir()                             # another persister's folder
    (tmp_path / "notes.txt").write_text("hello")
    assert mgr.latest() == mgr.path_for(3)
    assert mgr.restore(make_agent(0), Cfg)[2] == 3
    with pytest.raises(ValueError, match="incomplete"):
        EquinoxPersister().load(tmp_path / "ckpt_0000000008.eqx", make_agent(0), Cfg)


def test_manager_missing_or_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        CheckpointManager(tmp_path / "does-not-exist", create=False).restore(make_agent(), Cfg)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        CheckpointManager(tmp_path / "empty").restore(make_agent(), Cfg)
    assert CheckpointManager(tmp_path / "empty").latest() is None
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointManager(tmp_path, keep=0)


# ---- kill -9 while saving ------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import sys, types
    # import researchlab.design.* without the package __init__ (which pulls in every module: slow to start)
    pkg = types.ModuleType("researchlab"); pkg.__path__ = [sys.argv[2]]; sys.modules["researchlab"] = pkg
    import numpy as np
    from researchlab.design.core import Clock, State
    from researchlab.design.persist import CheckpointManager
    import jax, jax.numpy as jnp

    class S(State):
        clock: Clock
        big: np.ndarray
        tag: jax.Array

    mgr = CheckpointManager(sys.argv[1], keep=3)
    latest = mgr.latest()
    step = 0 if latest is None else int(latest.name[5:15])
    rng = np.random.default_rng(step)
    jax.block_until_ready(jnp.int32(0))  # start JAX's backend first: "ready" means the next save starts at once
    print("ready", flush=True)
    while True:
        step += 1
        big = np.full((1 << 20,), step, np.float32)  # 4 MB per checkpoint, every element = step
        mgr.save(S(Clock().advance(step), big, jnp.int32(step)), None, step)
""")


def test_kill_9_while_saving_never_leaves_a_bad_latest_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    ckpts = tmp_path / "ckpts"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    mgr = CheckpointManager(ckpts)

    import numpy as np

    class S(State):
        clock: Clock
        big: np.ndarray
        tag: jax.Array

    like = S(Clock(), np.zeros((1 << 20,), np.float32), jnp.int32(0))
    rnd, last_step, torn = random.Random(0), 0, 0
    for trial in range(20):
        child = subprocess.Popen([sys.executable, str(script), str(ckpts), str(Path(researchlab.__file__).parent)],
                                 env=env, stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready", f"trial {trial}: child did not start"
        time.sleep(rnd.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        torn += any(p.name.endswith(".tmp") for p in ckpts.iterdir())  # killed in the middle of a write
        # every file that looks like a checkpoint loads, and the latest is the highest step
        steps = []
        for step, path in mgr.checkpoints():
            state, _, stored = mgr.restore(like, None, path=path)
            assert stored == step == int(state.clock.step) == int(state.tag)
            assert float(state.big.min()) == float(state.big.max()) == step
            steps.append(step)
        if steps:
            assert mgr.latest() == mgr.path_for(max(steps))
            assert max(steps) >= last_step
            last_step = max(steps)
        assert len(steps) <= 4
    assert last_step > 0, "the child never completed a checkpoint; the test did not test anything"
    print(f"kill -9 test: {torn} of 20 kills left a half-written temp file behind; last step {last_step}")

"""PPO on gymnax CartPole (researchlab.examples.ppo) and the jnp CartPole renderer: learning, resumability through the
Loop and a real checkpoint, and clear errors for bad input."""

import warnings
from pathlib import Path

import equinox as eqx
import gymnax
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

from researchlab.design.infra import EquinoxPersister, NoBatch
from researchlab.design.loop import Loop
from researchlab.examples.cartpole_render import (
    CartPoleVisualizer,
    record_episode,
    render_cartpole,
    render_frames,
)
from researchlab.examples.ppo import (
    PastScheduleWarning,
    PPOConfig,
    collect_rollout,
    init_ppo,
    make_ppo_env,
    past_schedule_warning,
    ppo_loop,
    ppo_lr_schedule,
    ppo_step,
    rollout_episode,
)

SMALL = PPOConfig(num_envs=2, num_steps=32, total_steps=4096, hidden=16)


def test_ppo_learns_cartpole_in_60_updates():
    "PureJaxRL defaults: the mean return rises from ~30 (random policy) to well above 150 in 60 updates (30k steps)."
    cfg = PPOConfig(seed=0)
    step, state, returns = jax.jit(ppo_step), init_ppo(cfg), []
    for _ in range(60):
        state, m = step(state, cfg)
        returns.append(m["episode_return"])
    r = np.asarray(jnp.stack(returns))
    assert r[:10].mean() < 60 and r[-10:].mean() > 150, r
    assert int(state.clock.step) == 60 and int(state.clock.episode) > 100


def test_rollout_samples_actions_from_the_policy():
    "argmax(logits + Gumbel noise), drawn outside the scan, samples softmax(logits): a fixed 25/75 policy, 8192 draws."
    cfg = PPOConfig(num_envs=64, num_steps=128, hidden=16)
    state = init_ppo(cfg)
    head = state.model.actor[-1]
    fixed = eqx.tree_at(lambda h: (h.weight_I_O, h.bias_O), head,
                        (jnp.zeros_like(head.weight_I_O), jnp.log(jnp.array([1.0, 3.0]))))
    state = eqx.tree_at(lambda s: s.model.actor[-1], state, fixed)
    _, traj = jax.jit(collect_rollout, static_argnums=1)(state, cfg)
    assert abs(float(traj.action.mean()) - 0.75) < 0.02  # std of the mean: 0.005
    np.testing.assert_allclose(np.asarray(traj.logprob), np.where(np.asarray(traj.action) == 1, np.log(0.75),
                                                                  np.log(0.25)), atol=1e-5)
    # every (step, env) drew its own noise: the actions are not constant along either axis
    a = np.asarray(traj.action)
    assert a.std(axis=0).min() > 0 and a.std(axis=1).min() > 0


def test_loop_resume_from_checkpoint_is_exact(tmp_path: Path):
    "3 updates, checkpoint, resume in a new Loop, 3 more == 6 updates straight (bit for bit on CPU)."
    straight = Loop(SMALL, init_ppo(SMALL), ppo_step, NoBatch(), progress=False)
    straight.run(6)
    first = Loop(SMALL, init_ppo(SMALL), ppo_step, NoBatch(), persister=EquinoxPersister(),
                 checkpoint_dir=tmp_path / "ckpt", progress=False)
    first.run(3)  # a run's end saves a checkpoint
    resumed = Loop.resume(tmp_path / "ckpt", ppo_step, NoBatch(), like=init_ppo(SMALL), config=PPOConfig,
                          progress=False)
    assert resumed.step_count == 3 and resumed.config == SMALL
    resumed.run(3)
    a, b = jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rollout_episode_and_video(tmp_path: Path):
    state = init_ppo(SMALL)
    states, length, ret = jax.jit(rollout_episode, static_argnames=("config", "max_steps"))(
        state.model, SMALL, jax.random.key(0), max_steps=60)
    n = int(length)
    assert 1 <= n <= 60 and float(ret) == n  # CartPole pays 1 per step
    _, params = make_ppo_env(SMALL)
    assert (np.abs(np.asarray(states.theta[:n])) <= params.theta_threshold_radians).all()  # all upright while alive
    rec, length2 = record_episode(state.model, SMALL, tmp_path / "v" / "ep.mp4", key=jax.random.key(0),
                                  max_steps=60, height=64, width=96)
    assert length2 == n
    video = iio.imread(rec.path)
    assert video.shape == (n, 64, 96, 3)


def test_renderer_follows_the_state():
    env, params = gymnax.make("CartPole-v1")
    _, st = env.reset(jax.random.key(0), params)
    dark = lambda f: np.nonzero((np.asarray(f) < 50).all(-1).any(0))[0].mean()  # mean column of the cart
    xs = [-1.5, 0.0, 1.5]
    centres = [dark(render_cartpole(st.replace(x=jnp.float32(x)))) for x in xs]
    assert centres[0] < centres[1] < centres[2]
    np.testing.assert_allclose(np.diff(centres), 1.5 * 480 / 4.8, atol=2)  # 100 px per metre at width 480
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[st.replace(theta=jnp.float32(t)) for t in (-0.2, 0.0, 0.2)])
    frames = render_frames(stacked, 64, 96)
    assert frames.shape == (3, 64, 96, 3) and frames.dtype == jnp.uint8
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[2]))


@pytest.mark.parametrize("kwargs, culprit", [
    ({"num_minibatches": 3}, "num_minibatches = 3"),
    ({"total_steps": 100}, "total_steps = 100"),
    ({"gamma": 1.5}, "gamma"),
    ({"num_envs": 0}, "num_envs"),
    ({"learning_rate": 1e-3}, "learning_rate"),
])
def test_ppo_config_errors_name_the_field(kwargs: dict, culprit: str):
    with pytest.raises((ValidationError, ValueError), match=culprit):
        PPOConfig(**kwargs)


@pytest.mark.parametrize("field", ["lr", "clip_eps", "ent_coef", "vf_coef", "max_grad_norm", "gamma", "gae_lambda"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_ppo_config_floats_must_be_finite(field: str, value: float):
    with pytest.raises(ValidationError, match=f"{field}\n  Input should be a finite number .*input_value={value}"):
        PPOConfig(**{field: value})


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="'Pong-v9' is not a gymnax environment"):
        make_ppo_env(PPOConfig(env_name="Pong-v9"))
    env, params = gymnax.make("CartPole-v1")
    _, st = env.reset(jax.random.key(0), params)
    with pytest.raises(ValueError, match="width=100 must be a positive multiple of 16"):
        render_cartpole(st, height=64, width=100)
    with pytest.raises(ValueError, match="height=0"):
        CartPoleVisualizer(height=0)
    with pytest.raises(TypeError, match="got dict"):
        CartPoleVisualizer(64, 96).render({"x": 0.0})
    assert NoBatch().get_batch(init_ppo(SMALL)) is None and next(NoBatch()) is None


def test_lr_schedule_is_purejaxrl_inside_the_run_and_never_negative():
    "Inside the run: PureJaxRL's `lr * (1 - update / num_updates)`, bit for bit; past it: 0, never negative."
    cfg = PPOConfig(num_envs=2, num_steps=16, total_steps=160)  # 5 updates of 16 gradient steps
    schedule = jax.jit(ppo_lr_schedule(cfg))
    counts = jnp.arange(0, 40 * 16)  # 8 times the run's length
    lr = np.asarray(jax.vmap(schedule)(counts))
    inside = np.asarray(counts < cfg.num_updates * 16)
    purejaxrl = np.asarray(cfg.lr * (1.0 - (counts // 16) / cfg.num_updates))
    np.testing.assert_array_equal(lr[inside], purejaxrl[inside])
    assert (lr >= 0).all() and (lr[~inside] == 0).all(), lr[~inside]
    assert lr[inside].min() > 0  # the last update of the run still learns


def _model_leaves(loop: Loop) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(loop.state.model, eqx.is_array))]


@pytest.mark.parametrize("drive", ["run", "steps"])
def test_past_the_schedule_warns_once_and_keeps_the_policy(drive: str):
    "A PPO Loop driven past num_updates warns once (run or steps alike) and its model no longer changes."
    tiny = PPOConfig(num_envs=2, num_steps=16, total_steps=96, hidden=8)  # 3 updates
    loop = ppo_loop(tiny, progress=False, log_every=1)

    def go(n: int) -> None:
        if drive == "run":
            loop.run(n)
        else:
            for _ in loop.steps(n):
                pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        go(3)
        assert not caught, [str(w.message) for w in caught]  # the whole run: no warning
        trained = _model_leaves(loop)
        go(2)
        go(2)
    assert [w.category for w in caught] == [PastScheduleWarning], [str(w.message) for w in caught]
    assert "at update 4, past the run's length of 3 updates (total_steps=96)" in str(caught[0].message)
    for a, b in zip(trained, _model_leaves(loop)):
        np.testing.assert_array_equal(a, b)
    assert loop.step_count == 7 and loop.history[-1]["step"] == 7  # it kept stepping and logging


def test_resumed_ppo_loop_warns_past_the_schedule(tmp_path: Path):
    "The Callback attached by hand to a resumed Loop; a constant lr (anneal_lr=False) says training goes on."
    cfg = PPOConfig(num_envs=2, num_steps=16, total_steps=64, hidden=8, anneal_lr=False)  # 2 updates
    ppo_loop(cfg, progress=False, checkpoint_dir=tmp_path).run(2)
    resumed = Loop.resume(tmp_path, ppo_step, NoBatch(), like=init_ppo(cfg), config=PPOConfig, progress=False,
                          callbacks=[past_schedule_warning()])
    with pytest.warns(PastScheduleWarning, match="training goes on at the constant lr=0.00025"):
        resumed.run(1)

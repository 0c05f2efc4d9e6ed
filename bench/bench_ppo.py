"""PPO on CartPole-v1: researchlab's Loop + `ppo_step` against PureJaxRL's real `ppo.py` and rejax, same
hyper-parameters, in the same run; plus the 500-frame render + encode time and a 5-seed returns check.

Peers: PureJaxRL from `../shared/peers/purejaxrl` (or $PUREJAXRL_DIR; it needs `distrax`), rejax from PyPI.
`make bench` runs this with `.venv-bench/bin/python`, a venv layered on the project's `.venv` that adds only
rejax and distrax, so neither enters the test environment. A peer that cannot be imported is reported with the
reason, and the ratios fall back to the PureJaxRL-style re-implementation below (`make_baseline_train`).

Rows (each a ratio against PureJaxRL measured in the same run, with its range over `--repeats` runs):
- steady throughput (compiled programs, interleaved rounds): the Loop at 1 update per call, at
  `steps_per_call` of `rlab demo` (K=50: the largest divisor of its save_every=100 up to 64), at
  `--steps-per-call`, and `ppo_step` scanned in one jit; rejax's PPO. Targets: the demo's Loop >= 1.2x PureJaxRL
  and >= 1.0x rejax.
- breakdown: ms per update of PureJaxRL and of our kernel, its rollout alone and its gradient steps alone (the
  same math in both), so the share any Loop or kernel change can still act on is measured, not guessed.
- whole run including compilation, each in a fresh process with no compile cache: the demo's Loop against
  `jax.jit(make_train(config))(key)`. Target <= 1.0x PureJaxRL's time.
- one update per call: the Loop at `steps_per_call=1` against a bare Python loop calling `jax.jit(ppo_step)`,
  paired rounds of 100 updates; the difference per update (wall, and the main thread's CPU time, which load does
  not inflate). Target: median difference <= 0.2 ms.
- compile paid once: time to the first update of a second process sharing a persistent compile cache
  folder with a first one, over the first one's. Target <= 0.2x.
- the `rlab demo` process: wall time of a fresh `rlab demo total_steps=500000` (video off, and on) against a
  fresh process that runs PureJaxRL's `ppo.py` on the same settings (imports, compile, training), paired per
  round. Target: video off <= 1.2x the PureJaxRL process.
- scaling: throughput at 4, 64 and 256 environments against PureJaxRL at the same settings.
- correctness: 5 seeds reach a mean return >= 475 within 5e5 env steps (>= 4 of 5).
Timings on a shared 2-core machine are noisy: every row gives its best and its range over `--repeats` rounds,
and every target is a ratio (or a difference) between runs measured side by side in the same round, so load
hits both sides; the exit status is 1 when a target is missed.

Measured on 2026-12-02 (evening), 2-core CPU, load average 0.2-1.4, `--repeats 3` (best, low-high over the rounds),
after PPO's minibatch order became `keyed_permutation` (a keyed Feistel bijection, 3 us per epoch at 512
transitions, where `jax.random.permutation`'s key-value sort took 67 us):
- steady: PureJaxRL 155,905 env steps/s; rejax 1.039x PureJaxRL; Loop K=1 1.000x (1.00-1.12); Loop K=50 (rlab
  demo) 1.269x (1.18-1.42), 1.222x rejax (1.13-1.27); Loop K=244 1.281x (1.18-1.40); kernel alone in one jit
  1.151x (1.13-1.29). The targets (1.2x PureJaxRL, 1.0x rejax) are met at best; the lowest round was 1.18x.
- breakdown: PureJaxRL 3.286 ms per update; our kernel 2.539 ms: rollout 0.693 ms, the 16 gradient steps alone
  1.708 ms (52% of PureJaxRL's update, the same math in both, matmul-bound on one core), the rest 0.138 ms (0.471 ms
  before the change of shuffle).
- one update per call: Loop - bare jitted loop, median -0.001 ms per update (-0.070 to +0.512), main-thread CPU
  +0.009 ms.
- whole run incl. compile, fresh processes: Loop K=50 7.62 s (7.62-8.65), PureJaxRL 8.37 s (8.37-9.87): 0.910x
  (0.82-0.91).
- compile paid once: 2nd process / 1st time to first update 0.233 (0.233-0.297; 5.16 s -> 1.20 s): missed. The
  cached process still traces and lowers both programs (init_ppo's and the Loop's, about 0.6 s) to find them in
  the cache, and loads them (about 0.25 s). At load 3-5 on the same day it was 0.117 (8.40 s -> 0.98 s).
- `rlab demo` process, video off: 12.66 s (12.66-14.83) against PureJaxRL's script 12.47 s (12.47-14.76): 1.016x
  (1.00-1.03); video on 1.226x.
- scaling (Loop / PureJaxRL throughput): 4 envs 1.236x, 64 envs 1.517x (1.52-1.57), 256 envs 1.756x (1.61-1.76).
- video: 500 frames rendered and encoded in 1.11 s, 18.8x matplotlib's frame rate. Seeds: 5/5 reach 475.

    python bench/bench_ppo.py [--repeats 3] [--only steady,breakdown,percall,whole,cache,demo,scaling,video,seeds]
                              [--skip-seeds] [--skip-scaling] [--steps-per-call 244]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.initializers import constant, orthogonal
from flax.training.train_state import TrainState

from researchlab.design.infra import NoBatch
from researchlab.design.loop import Loop
from researchlab.design.population import stack_states
from researchlab.examples.cartpole_render import CartPoleVisualizer
from researchlab.examples.ppo import PPOConfig, collect_rollout, init_ppo, ppo_loss, ppo_step, rollout_episode

# ---------------------------------------------------------------------------------------------------------
# Baseline: PureJaxRL's ppo.py (flax linen network, everything inside one jitted `train(key)`)
# ---------------------------------------------------------------------------------------------------------


class _BaselineActorCritic(nn.Module):
    action_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(x))
        a = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(a))
        logits = nn.Dense(self.action_dim, kernel_init=orthogonal(0.01), bias_init=constant(0.0))(a)
        c = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(x))
        c = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(c))
        value = nn.Dense(1, kernel_init=orthogonal(1.0), bias_init=constant(0.0))(c)
        return logits, jnp.squeeze(value, axis=-1)


class _Transition(NamedTuple):
    done: jax.Array
    action: jax.Array
    value: jax.Array
    reward: jax.Array
    log_prob: jax.Array
    obs: jax.Array
    returned: jax.Array  # episode return where done, else 0


def make_baseline_train(c: PPOConfig):
    "PureJaxRL-style `train(key)`: the whole run in one function, to be jitted once."
    env, env_params = gymnax.make(c.env_name)
    num_updates = c.num_updates
    minibatch_size = c.batch_size // c.num_minibatches

    def linear_schedule(count):
        return c.lr * (1.0 - (count // (c.num_minibatches * c.update_epochs)) / num_updates)

    def train(rng):
        network = _BaselineActorCritic(env.action_space(env_params).n)
        rng, _rng = jax.random.split(rng)
        params = network.init(_rng, jnp.zeros(env.observation_space(env_params).shape))
        tx = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), optax.adam(linear_schedule, eps=1e-5))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        rng, _rng = jax.random.split(rng)
        obsv, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(_rng, c.num_envs), env_params)
        ep_ret = jnp.zeros((c.num_envs,))

        def _update_step(runner_state, unused):
            def _env_step(runner_state, unused):
                train_state, env_state, last_obs, ep_ret, rng = runner_state
                rng, _rng = jax.random.split(rng)
                logits, value = network.apply(train_state.params, last_obs)
                action = jax.random.categorical(_rng, logits)
                log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], 1)[:, 0]
                rng, _rng = jax.random.split(rng)
                obsv, env_state, reward, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                    jax.random.split(_rng, c.num_envs), env_state, action, env_params)
                done = term | trunc
                ep_ret = ep_ret + reward
                t = _Transition(done, action, value, reward, log_prob, last_obs, jnp.where(done, ep_ret, 0.0))
                return (train_state, env_state, obsv, jnp.where(done, 0.0, ep_ret), rng), t

            runner_state, traj_batch = jax.lax.scan(_env_step, runner_state, None, c.num_steps)
            train_state, env_state, last_obs, ep_ret, rng = runner_state
            _, last_val = network.apply(train_state.params, last_obs)

            def _calculate_gae(traj_batch, last_val):
                def _get_advantages(gae_and_next_value, transition):
                    gae, next_value = gae_and_next_value
                    done, value, reward = transition.done, transition.value, transition.reward
                    delta = reward + c.gamma * next_value * (1 - done) - value
                    gae = delta + c.gamma * c.gae_lambda * (1 - done) * gae
                    return (gae, value), gae

                _, advantages = jax.lax.scan(_get_advantages, (jnp.zeros_like(last_val), last_val), traj_batch,
                                             reverse=True, unroll=16)
                return advantages, advantages + traj_batch.value

            advantages, targets = _calculate_gae(traj_batch, last_val)

            def _update_epoch(update_state, unused):
                def _update_minbatch(train_state, batch_info):
                    traj_batch, advantages, targets = batch_info

                    def _loss_fn(params, traj_batch, gae, targets):
                        logits, value = network.apply(params, traj_batch.obs)
                        logp_all = jax.nn.log_softmax(logits)
                        log_prob = jnp.take_along_axis(logp_all, traj_batch.action[:, None], 1)[:, 0]
                        value_pred_clipped = traj_batch.value + (value - traj_batch.value).clip(-c.clip_eps, c.clip_eps)
                        value_losses = jnp.square(value - targets)
                        value_losses_clipped = jnp.square(value_pred_clipped - targets)
                        value_loss = 0.5 * jnp.maximum(value_losses, value_losses_clipped).mean()
                        ratio = jnp.exp(log_prob - traj_batch.log_prob)
                        gae = (gae - gae.mean()) / (gae.std() + 1e-8)
                        loss_actor1 = ratio * gae
                        loss_actor2 = jnp.clip(ratio, 1.0 - c.clip_eps, 1.0 + c.clip_eps) * gae
                        loss_actor = -jnp.minimum(loss_actor1, loss_actor2).mean()
                        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
                        total_loss = loss_actor + c.vf_coef * value_loss - c.ent_coef * entropy
                        return total_loss, (value_loss, loss_actor, entropy)

                    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
                    total_loss, grads = grad_fn(train_state.params, traj_batch, advantages, targets)
                    train_state = train_state.apply_gradients(grads=grads)
                    return train_state, total_loss

                train_state, traj_batch, advantages, targets, rng = update_state
                rng, _rng = jax.random.split(rng)
                permutation = jax.random.permutation(_rng, c.batch_size)
                batch = (traj_batch, advantages, targets)
                batch = jax.tree.map(lambda x: x.reshape((c.batch_size,) + x.shape[2:]), batch)
                shuffled_batch = jax.tree.map(lambda x: jnp.take(x, permutation, axis=0), batch)
                minibatches = jax.tree.map(
                    lambda x: jnp.reshape(x, [c.num_minibatches, minibatch_size] + list(x.shape[1:])), shuffled_batch)
                train_state, total_loss = jax.lax.scan(_update_minbatch, train_state, minibatches)
                return (train_state, traj_batch, advantages, targets, rng), total_loss

            update_state = (train_state, traj_batch, advantages, targets, rng)
            update_state, loss_info = jax.lax.scan(_update_epoch, update_state, None, c.update_epochs)
            train_state, rng = update_state[0], update_state[-1]
            n_done = traj_batch.done.sum()
            metric = jnp.where(n_done > 0, traj_batch.returned.sum() / jnp.maximum(n_done, 1), jnp.nan)
            return (train_state, env_state, last_obs, ep_ret, rng), metric

        rng, _rng = jax.random.split(rng)
        runner_state = (train_state, env_state, obsv, ep_ret, _rng)
        runner_state, metric = jax.lax.scan(_update_step, runner_state, None, num_updates)
        return {"runner_state": runner_state, "metrics": metric}

    return train


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
PUREJAXRL_DIR = Path(os.environ.get("PUREJAXRL_DIR", ROOT.parent / "shared" / "peers" / "purejaxrl"))
Runner = Callable[[], tuple[float, np.ndarray]]  # one training run -> (seconds of the run, returns per update)


def purejaxrl_config(c: PPOConfig) -> dict:
    "PureJaxRL's CartPole config (its `__main__`), with our env count, steps and budget; DEBUG off (no callbacks)."
    return {"LR": c.lr, "NUM_ENVS": c.num_envs, "NUM_STEPS": c.num_steps, "TOTAL_TIMESTEPS": c.total_steps,
            "UPDATE_EPOCHS": c.update_epochs, "NUM_MINIBATCHES": c.num_minibatches, "GAMMA": c.gamma,
            "GAE_LAMBDA": c.gae_lambda, "CLIP_EPS": c.clip_eps, "ENT_COEF": c.ent_coef, "VF_COEF": c.vf_coef,
            "MAX_GRAD_NORM": c.max_grad_norm, "ACTIVATION": "tanh", "ENV_NAME": c.env_name, "ANNEAL_LR": c.anneal_lr,
            "DEBUG": False}


def purejaxrl_train(c: PPOConfig) -> Callable:
    "PureJaxRL's `make_train(config)`; raises ImportError naming what is missing."
    if not (PUREJAXRL_DIR / "ppo.py").exists():
        raise ImportError(f"no PureJaxRL at {PUREJAXRL_DIR} (set PUREJAXRL_DIR)")
    sys.path.insert(0, str(PUREJAXRL_DIR))
    try:
        from ppo import make_train  # the peer's own module
    finally:
        sys.path.remove(str(PUREJAXRL_DIR))
    return make_train(purejaxrl_config(c))


def _purejaxrl_returns(metrics: dict) -> np.ndarray:
    "Mean return of the episodes that ended in each update (NaN where none did)."
    done, ret = np.asarray(metrics["returned_episode"]), np.asarray(metrics["returned_episode_returns"])
    n = done.reshape(done.shape[0], -1).sum(1)
    return np.where(n > 0, (ret * done).reshape(done.shape[0], -1).sum(1) / np.maximum(n, 1), np.nan)


def prepare_baseline(cfg: PPOConfig) -> tuple[float, Runner, str]:
    "(compile s, runner, label) for PureJaxRL's real ppo.py, or the re-implementation below where it is absent."
    try:
        train, label = purejaxrl_train(cfg), "PureJaxRL ppo.py (one jit)"
        key, returns = jax.random.PRNGKey(cfg.seed), _purejaxrl_returns  # the peer takes a raw uint32 key
    except ImportError as e:
        train = make_baseline_train(cfg)
        label = f"PureJaxRL-style re-implementation (real peer unavailable: {e})"
        key, returns = jax.random.key(cfg.seed), np.asarray
    t0 = time.perf_counter()
    compiled = jax.jit(train).lower(key).compile()
    compile_s = time.perf_counter() - t0

    def run() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(key))
        return time.perf_counter() - t0, returns(out["metrics"])

    return compile_s, run, label


def prepare_rejax(cfg: PPOConfig) -> tuple[float, Runner]:
    "(compile s, runner) for rejax's PPO with our hyper-parameters (tanh 64x64; rejax has no lr annealing)."
    from rejax import PPO  # bench-only dependency (.venv-bench)
    from rejax.evaluate import evaluate

    class FiveValueStep:  # rejax 0.1.3 unpacks gymnax < 1.0's 5-value step; the same patch as PureJaxRL's peer copy
        def __init__(self, env: object):
            self.env = env

        def step(self, key: jax.Array, state: object, action: jax.Array, params: object) -> tuple:
            obs, state, reward, terminated, truncated, info = self.env.step(key, state, action, params)
            return obs, state, reward, terminated | truncated, info

        def __getattr__(self, name: str) -> object:  # reset, spaces, default_params: gymnax's own
            if name == "env":  # not set yet (copy.deepcopy builds the object without __init__)
                raise AttributeError(name)
            return getattr(self.env, name)

    env, env_params = gymnax.make(cfg.env_name)
    algo = PPO.create(env=FiveValueStep(env), env_params=env_params, num_envs=cfg.num_envs, num_steps=cfg.num_steps, num_epochs=cfg.update_epochs,
                      num_minibatches=cfg.num_minibatches, learning_rate=cfg.lr, max_grad_norm=cfg.max_grad_norm,
                      total_timesteps=cfg.total_steps, eval_freq=cfg.total_steps, skip_initial_evaluation=True,
                      gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_eps=cfg.clip_eps, ent_coef=cfg.ent_coef,
                      vf_coef=cfg.vf_coef, agent_kwargs={"activation": "tanh"})
    algo = algo.replace(eval_callback=lambda a, ts, rng: ())  # no evaluation inside the timed run
    t0 = time.perf_counter()
    compiled = jax.jit(algo.train).lower(jax.random.PRNGKey(cfg.seed)).compile()
    compile_s = time.perf_counter() - t0

    def run() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        ts, _ = jax.block_until_ready(compiled(jax.random.PRNGKey(cfg.seed)))
        dt = time.perf_counter() - t0
        _, returns = evaluate(algo.make_act(ts), jax.random.PRNGKey(1), algo.env, env_params, 16, 500)
        return dt, np.asarray([float(np.mean(returns))])

    return compile_s, run


def demo_steps_per_call(cfg: PPOConfig) -> int:
    "The `steps_per_call` of the Loop `rlab demo` trains with (its default options)."
    from researchlab.examples.demo import DemoCLIConfig, ppo_experiment

    with tempfile.TemporaryDirectory() as d:
        return ppo_experiment(DemoCLIConfig()).make_loop(init_ppo(cfg), checkpoint_dir=d).steps_per_call


def prepare_ours(cfg: PPOConfig, steps_per_call: int = 1) -> tuple[float, Runner]:
    """(compile s, runner) for `ppo_step` driven by the `Loop` (metrics logged every 10 updates), as `rlab demo`
    runs it. Each run builds a new Loop, which finds the program the first one compiled (equal Config, kernel and
    State structure), and times the whole run."""
    s0 = init_ppo(cfg)

    def run() -> tuple[float, np.ndarray]:
        loop = Loop(cfg, s0, ppo_step, NoBatch(), log_every=10, progress=False, steps_per_call=steps_per_call)
        t0 = time.perf_counter()
        loop.run(cfg.num_updates)
        jax.block_until_ready(loop.state)
        return time.perf_counter() - t0, loop.metric("episode_return")[1]

    t0 = time.perf_counter()
    loop = Loop(cfg, s0, ppo_step, NoBatch(), progress=False, steps_per_call=steps_per_call)
    loop.run(1)
    jax.block_until_ready(loop.state)
    return time.perf_counter() - t0, run


def prepare_kernel_scan(cfg: PPOConfig) -> tuple[float, Runner]:
    """(compile s, runner) for `ppo_step` scanned over the whole run in one jit, without the Loop: not a product
    path, a reference that splits our gap to the baseline into kernel cost and Loop/dispatch cost."""
    s0 = init_ppo(cfg)

    def train(s: object) -> tuple[object, jax.Array]:
        s, m = jax.lax.scan(lambda s, _: ppo_step(s, cfg), s, None, length=cfg.num_updates)
        return s, m["episode_return"]

    t0 = time.perf_counter()
    compiled = jax.jit(train).lower(s0).compile()
    compile_s = time.perf_counter() - t0

    def run() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(s0))
        return time.perf_counter() - t0, np.asarray(out[1])

    return compile_s, run


def interleaved(runs: dict[str, Runner], repeats: int) -> dict[str, list[tuple[float, np.ndarray]]]:
    "Every run `repeats` times, alternating the runs so that load spikes hit all of them."
    out: dict[str, list[tuple[float, np.ndarray]]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            out[name].append(run())
    return out


def ratio_range(ours: list[float], base: list[float]) -> tuple[float, float, float]:
    "(best, low, high) of base/ours per round: a speed ratio against the baseline measured in the same round."
    r = [b / o for o, b in zip(ours, base)]
    return min(base) / min(ours), min(r), max(r)


# ---- fresh processes: whole run including compilation, and the persistent compile cache ----------------
def whole_run(what: str, cfg: PPOConfig, k: int) -> dict[str, float]:
    "In this (fresh) process: seconds to the first update and to the end of a whole run, compilation included."
    t0 = time.perf_counter()
    if what == "purejaxrl":
        try:
            train, key = purejaxrl_train(cfg), jax.random.PRNGKey(cfg.seed)
        except ImportError:
            train, key = make_baseline_train(cfg), jax.random.key(cfg.seed)
        jax.block_until_ready(jax.jit(train)(key))
        total = time.perf_counter() - t0
        return {"first": total, "total": total}  # one program: its first update comes with the whole run
    s0 = jax.block_until_ready(init_ppo(cfg))
    init = time.perf_counter() - t0  # init_ppo is one jitted program: its compile is most of this
    loop = Loop(cfg, s0, ppo_step, NoBatch(), log_every=10, progress=False, steps_per_call=k)
    loop.run(k)
    jax.block_until_ready(loop.state)
    first = time.perf_counter() - t0
    loop.run(cfg.num_updates - k)
    jax.block_until_ready(loop.state)
    return {"init": init, "first": first, "total": time.perf_counter() - t0}


def fresh_process(what: str, cache: str | None) -> dict[str, float]:
    "Run `whole_run(what)` in a new interpreter, with a compile cache folder or none; the Loop at rlab demo's K."
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["RLAB_COMPILE_CACHE"] = cache or "off"
    argv = [sys.executable, __file__, "--whole", what, "--whole-k", str(demo_steps_per_call(PPOConfig()))]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"fresh process {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_per_call(cfg: PPOConfig, rounds: int, n: int = 100) -> dict[str, list[float]]:
    """Per round, seconds per update (wall and main-thread CPU) of a bare Python loop calling `jax.jit(ppo_step)`
    and of the Loop at one update per call (log_every=10), each over `n` updates, run back to back."""
    s0 = init_ppo(cfg)
    step = jax.jit(lambda s: ppo_step(s, cfg))
    loop = Loop(cfg, s0, ppo_step, NoBatch(), log_every=10, progress=False)

    def bare() -> tuple[float, float]:
        s, t, c = s0, time.perf_counter(), time.thread_time()
        for _ in range(n):
            s, _ = step(s)
        jax.block_until_ready(s)
        return (time.perf_counter() - t) / n, (time.thread_time() - c) / n

    def looped() -> tuple[float, float]:
        t, c = time.perf_counter(), time.thread_time()
        loop.run(n)
        jax.block_until_ready(loop.state)
        return (time.perf_counter() - t) / n, (time.thread_time() - c) / n

    bare(), looped()  # compile both
    out: dict[str, list[float]] = {"bare": [], "loop": [], "bare_cpu": [], "loop_cpu": []}
    for i in range(rounds):
        order = (("bare", bare), ("loop", looped)) if i % 2 == 0 else (("loop", looped), ("bare", bare))
        for name, fn in order:  # alternate who goes first, so a load change hits both alike
            wall, cpu = fn()
            out[name].append(wall)
            out[f"{name}_cpu"].append(cpu)
    return out


def bench_breakdown(cfg: PPOConfig, rounds: int) -> dict[str, list[float]]:
    """Per round, ms per update of PureJaxRL and of: the whole kernel (`ppo_step` scanned over the run in one jit), its rollout alone
    (`collect_rollout` scanned alike), and its gradient steps alone: `update_epochs x num_minibatches` forward and
    backward passes of `ppo_loss` at the minibatch size, on a fixed rollout (no optimizer, no shuffling). The
    gradient steps are the math PureJaxRL runs too, so their share bounds what any Loop can gain on it."""
    s0, n = init_ppo(cfg), cfg.num_updates
    _, traj = collect_rollout(s0, cfg)
    flat = jax.tree.map(lambda x: x.reshape((cfg.batch_size,) + x.shape[2:]), traj)
    mb = jax.tree.map(lambda x: x[:cfg.minibatch_size], (flat, flat.value, flat.value))
    steps = n * cfg.update_epochs * cfg.num_minibatches

    def grads(model: object) -> object:
        def one(m: object, _: None) -> tuple[object, None]:
            g = jax.grad(lambda m: ppo_loss(m, *mb, cfg)[0])(m)
            return jax.tree.map(lambda p, d: p - 1e-9 * d, m, g), None  # a dependent chain, as in training
        return jax.lax.scan(one, model, None, length=steps)[0]

    progs = {"kernel": (jax.jit(lambda s: jax.lax.scan(lambda s, _: ppo_step(s, cfg), s, None, length=n)), s0),
             "rollout": (jax.jit(lambda s: jax.lax.scan(lambda s, _: collect_rollout(s, cfg), s, None, length=n)), s0),
             "grads": (jax.jit(grads), s0.model)}
    compiled = {k: f.lower(x).compile() for k, (f, x) in progs.items()}
    _, baseline, _ = prepare_baseline(cfg)
    out: dict[str, list[float]] = {k: [] for k in (*progs, "purejaxrl")}
    for _ in range(rounds):
        for k, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(progs[k][1]))
            out[k].append((time.perf_counter() - t0) / n * 1e3)
        out["purejaxrl"].append(baseline()[0] / n * 1e3)
    return out


PUREJAXRL_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import jax
from ppo import make_train
out = jax.block_until_ready(jax.jit(make_train(json.loads(sys.argv[2])))(jax.random.PRNGKey(0)))
print(json.dumps({"after_imports": time.perf_counter() - t0}))
"""


def demo_process(what: str, cfg: PPOConfig) -> float:
    """Wall seconds of a fresh process: `rlab demo` (`what` = "demo" or "demo+video") in a temporary folder with
    its own MLflow store, or a PureJaxRL script training the same run ("purejaxrl"); no compile cache."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), RLAB_COMPILE_CACHE="off")
    with tempfile.TemporaryDirectory() as d:
        if what == "purejaxrl":
            cmd = [sys.executable, "-c", PUREJAXRL_SCRIPT, str(PUREJAXRL_DIR), json.dumps(purejaxrl_config(cfg))]
        else:
            cmd = [sys.executable, "-m", "researchlab.cli", "demo", f"total_steps={cfg.total_steps}",
                   f"num_envs={cfg.num_envs}", f"video={'true' if what == 'demo+video' else 'false'}",
                   f"tracking_uri=sqlite:///{d}/mlflow.db", f"runs_dir={d}/runs"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{what} process failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return wall


def bench_scaling(repeats: int, envs: tuple[int, ...] = (4, 64, 256)) -> list[tuple[int, float, float, float]]:
    "Per env count: (envs, best, low, high) of the Loop's throughput over PureJaxRL's at the same settings."
    rows = []
    for n in envs:
        cfg = PPOConfig(num_envs=n)
        _, brun, _ = prepare_baseline(cfg)
        k = min(demo_steps_per_call(cfg), cfg.num_updates)
        _, orun = prepare_ours(cfg, steps_per_call=k)
        times = interleaved({"base": brun, "ours": orun}, repeats)
        rows.append((n, *ratio_range([t for t, _ in times["ours"]], [t for t, _ in times["base"]])))
    return rows


def bench_video(cfg: PPOConfig) -> tuple[float, float, float]:
    "(render-only s, render + encode s, matplotlib fps) for a 500-frame rollout at 320x480."
    env, env_params = gymnax.make(cfg.env_name)
    states, _, _ = jax.jit(rollout_episode, static_argnames=("config", "max_steps"))(
        init_ppo(cfg).model, cfg, jax.random.key(0), max_steps=500)
    CartPoleVisualizer().draw_batch(states)  # compile the renderer once (not part of the figure)
    t0 = time.perf_counter()
    CartPoleVisualizer().draw_batch(states)
    render_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        vis = CartPoleVisualizer(record=True, path=Path(d) / "ep.mp4")  # the path record_episode takes
        vis.render_batch(states)
        vis.video()
        total_s = time.perf_counter() - t0  # end to end: render + validate + encode, as record_episode does
    # reference: drawing each frame with matplotlib (what gymnax's Visualizer does), 25 frames
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
    xs, ths = np.asarray(states.x), np.asarray(states.theta)
    t0 = time.perf_counter()
    for i in range(25):
        ax.clear()
        ax.set_xlim(-2.4, 2.4)
        ax.set_ylim(-0.5, 1.5)
        ax.add_patch(plt.Rectangle((xs[i] - 0.25, -0.15), 0.5, 0.3, color="k"))
        ax.plot([xs[i], xs[i] + np.sin(ths[i])], [0, np.cos(ths[i])], lw=5)
        fig.canvas.draw()
        np.asarray(fig.canvas.buffer_rgba())
    mpl_fps = 25 / (time.perf_counter() - t0)
    plt.close(fig)
    return render_s, total_s, mpl_fps


def bench_seeds(cfg: PPOConfig, seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> list[tuple[int, float, float]]:
    "Per seed: (seed, best 10-update mean return, final 10-update mean return), all seeds vmapped in one run."
    # one init per seed, stacked: a vmapped init_ppo batches its orthogonal initialisers into LAPACK QR calls, which
    # can deadlock XLA's 2-thread CPU pool (see bench_population.py)
    states = stack_states([init_ppo(cfg, jax.random.key(s)) for s in seeds])
    step = jax.jit(jax.vmap(ppo_step, in_axes=(0, None)))
    returns = []
    for _ in range(cfg.num_updates):
        states, m = step(states, cfg)
        returns.append(m["episode_return"])
    r = np.asarray(jnp.stack(returns))  # (updates, seeds)
    smooth = np.stack([np.convolve(r[:, i], np.ones(10) / 10, mode="valid") for i in range(len(seeds))], 1)
    return [(s, float(smooth[:, i].max()), float(smooth[-1, i])) for i, s in enumerate(seeds)]


SECTIONS = ("steady", "breakdown", "percall", "whole", "cache", "demo", "scaling", "video", "seeds")


def _rng(xs: list[float], fmt: str = ".2f") -> str:
    "`low-high` of a row's values over the rounds."
    return f"{min(xs):{fmt}}-{max(xs):{fmt}}"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated rows to run, of {', '.join(SECTIONS)}")
    ap.add_argument("--skip-seeds", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--steps-per-call", type=int, default=244, help="K of the second fused row")
    ap.add_argument("--whole", choices=("purejaxrl", "loop"), help=argparse.SUPPRESS)  # a fresh-process row
    ap.add_argument("--whole-k", type=int, default=1, help=argparse.SUPPRESS)  # its Loop's steps_per_call
    args = ap.parse_args(argv)
    cfg = PPOConfig()
    if args.whole:
        if os.environ.get("RLAB_COMPILE_CACHE", "off") != "off":
            from researchlab.design.compile_cache import enable_compile_cache

            enable_compile_cache(min_compile_time_s=0)
        print(json.dumps(whole_run(args.whole, cfg, args.whole_k)))
        return 0
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if unknown := only - set(SECTIONS):
        ap.error(f"--only: unknown rows {sorted(unknown)}; the rows are {', '.join(SECTIONS)}")
    only -= {"seeds"} if args.skip_seeds else set()
    only -= {"scaling"} if args.skip_scaling else set()
    R = args.repeats
    print(f"device: {jax.devices()[0].platform}, config: {cfg.num_envs} envs x {cfg.num_steps} steps, "
          f"{cfg.update_epochs} epochs x {cfg.num_minibatches} minibatches, {cfg.total_steps} env steps; "
          f"ratios: PureJaxRL time / ours (> 1: we are faster), best (low-high over {R} rounds)")
    failures = []

    if "steady" in only:
        bc, brun, blabel = prepare_baseline(cfg)
        runs = {"base": brun}
        rows = [(blabel, bc, "base")]
        try:
            rc, rrun = prepare_rejax(cfg)
            runs["rejax"] = rrun
            rows.append(("rejax PPO (one jit)", rc, "rejax"))
        except ImportError as e:
            print(f"rejax: not measured ({e}); `make bench` installs it into .venv-bench")
        K, kd = args.steps_per_call, demo_steps_per_call(cfg)
        for label, key, k in (("Loop + ppo_step, 1 update/call", "ours", 1),
                              (f"Loop steps_per_call={kd} (rlab demo)", "fused", kd),
                              (f"Loop steps_per_call={K}", "fused_big", K)):
            c, run = prepare_ours(cfg, steps_per_call=k)
            runs[key] = run
            rows.append((label, c, key))
        kc, krun = prepare_kernel_scan(cfg)
        runs["kernel"] = krun
        rows.append(("(reference) ppo_step in one jit, no Loop", kc, "kernel"))
        times = interleaved(runs, R)
        steps = cfg.num_updates * cfg.batch_size
        base_t = [t for t, _ in times["base"]]
        ratio = {}
        for label, comp, key in rows:
            ts = [t for t, _ in times[key]]
            ratio[key] = ratio_range(ts, base_t)
            rets = times[key][int(np.argmin(ts))][1]
            print(f"{label:<40}: compile {comp:5.2f} s, 5e5 steps in {min(ts):5.2f} s ({_rng(ts)}) = "
                  f"{steps / min(ts):>9,.0f} env steps/s, ratio {ratio[key][0]:.3f} ({ratio[key][1]:.2f}-"
                  f"{ratio[key][2]:.2f}), final return {float(np.nanmean(rets[-3:])):.1f}")
        target = f"target >= 1.2x PureJaxRL{' and >= rejax' if 'rejax' in ratio else ''}"
        if "rejax" in ratio:
            rj = ratio_range([t for t, _ in times["fused"]], [t for t, _ in times["rejax"]])
            kr = ratio_range([t for t, _ in times["kernel"]], [t for t, _ in times["rejax"]])
            vs_rejax = f"{rj[0]:.3f}x rejax ({rj[1]:.2f}-{rj[2]:.2f}; kernel alone {kr[0]:.3f}x rejax)"
        else:
            rj, vs_rejax = None, "rejax not measured"
        print(f"steady throughput, Loop K={kd} (rlab demo): {ratio['fused'][0]:.3f}x PureJaxRL, {vs_rejax} "
              f"({target}); kernel alone in one jit {ratio['kernel'][0]:.3f}x PureJaxRL")
        if ratio["fused"][0] < 1.2 or (rj is not None and rj[0] < 1.0):
            failures.append("throughput")

    if "breakdown" in only:
        bd = bench_breakdown(cfg, R)
        p, k, r, g = (min(bd[x]) for x in ("purejaxrl", "kernel", "rollout", "grads"))
        print(f"breakdown per update: PureJaxRL {p:.3f} ms; our kernel {k:.3f} ms ({_rng(bd['kernel'], '.3f')}): its "
              f"rollout {r:.3f} ms, its {cfg.update_epochs * cfg.num_minibatches} gradient steps alone {g:.3f} ms "
              f"({g / p:.0%} of PureJaxRL's update; the same math in both), the rest {max(k - r - g, 0):.3f} ms. "
              f"A kernel 1.2x PureJaxRL has {p / 1.2 - g:.3f} ms for all but the gradient steps; ours spends "
              f"{k - g:.3f} ms there")

    if "percall" in only:
        pc = bench_per_call(cfg, max(R, 5))
        d = [1e3 * (o - b) for o, b in zip(pc["loop"], pc["bare"])]
        dc = [1e3 * (o - b) for o, b in zip(pc["loop_cpu"], pc["bare_cpu"])]
        print(f"one update per call: bare jitted Python loop {1e3 * min(pc['bare']):.3f} ms/update, Loop "
              f"{1e3 * min(pc['loop']):.3f} ms/update; Loop - bare per update, paired rounds: median "
              f"{np.median(d):+.3f} ms ({_rng(d, '+.3f')}), main-thread CPU {np.median(dc):+.3f} ms "
              f"({_rng(dc, '+.3f')}) (target: median <= +0.2 ms)")
        if np.median(d) > 0.2:
            failures.append("per-call overhead")

    if "whole" in only:
        whole = {"purejaxrl": [], "loop": []}
        for _ in range(R):  # paired rounds: each round runs both, one after the other
            for w in whole:
                whole[w].append(fresh_process(w, None))
        pt, lt = [w["total"] for w in whole["purejaxrl"]], [w["total"] for w in whole["loop"]]
        r = [o / b for o, b in zip(lt, pt)]
        init = [w["init"] for w in whole["loop"]]
        rest = [o - i for o, i in zip(lt, init)]
        print(f"whole run incl. compile, fresh process, no cache: Loop K={demo_steps_per_call(cfg)} {min(lt):.2f} s ({_rng(lt)}), PureJaxRL "
              f"{min(pt):.2f} s ({_rng(pt)}): {min(lt) / min(pt):.3f}x PureJaxRL's time ({min(r):.2f}-{max(r):.2f}) "
              f"(target <= 1.0x); of the Loop's time, init_ppo (one jit) {min(init):.2f} s ({_rng(init)}), Loop from "
              f"the State on {min(rest) / min(pt):.3f}x PureJaxRL's time "
              f"({_rng([x / b for x, b in zip(rest, pt)])})")
        if min(lt) / min(pt) > 1.0:
            failures.append("whole run")

    if "cache" in only:
        cached = []
        for _ in range(R):
            with tempfile.TemporaryDirectory() as d:
                first, second = fresh_process("loop", d), fresh_process("loop", d)
                cached.append((second["first"] / first["first"], first["first"], second["first"],
                               second["total"] / first["total"]))
        best = min(cached)
        print(f"compile paid once: time to first update, 2nd process / 1st with a shared cache folder {best[0]:.3f} "
              f"({_rng([c[0] for c in cached], '.3f')}; {best[1]:.2f} s -> {best[2]:.2f} s; whole run {best[3]:.2f}x "
              f"({_rng([c[3] for c in cached])})) (target <= 0.2)")
        if best[0] > 0.2:
            failures.append("compile cache")

    if "demo" in only:
        procs: dict[str, list[float]] = {"purejaxrl": [], "demo": [], "demo+video": []}
        try:
            for _ in range(R):
                for w in procs:
                    procs[w].append(demo_process(w, cfg))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"rlab demo process: not measured ({e})")
            failures.append("demo process")
        else:
            pj = procs["purejaxrl"]
            for w in ("demo", "demo+video"):
                r = [o / b for o, b in zip(procs[w], pj)]
                print(f"`rlab demo{' video=true' if w == 'demo+video' else ' video=false'}` process: "
                      f"{min(procs[w]):.2f} s ({_rng(procs[w])}), PureJaxRL script process {min(pj):.2f} s "
                      f"({_rng(pj)}): {min(procs[w]) / min(pj):.3f}x ({min(r):.2f}-{max(r):.2f})"
                      f"{' (target <= 1.2x)' if w == 'demo' else ''}")
            if min(procs["demo"]) / min(pj) > 1.2:
                failures.append("demo process")

    if "scaling" in only:
        for n, b, lo, hi in bench_scaling(R):
            print(f"scaling, {n:>3} envs: Loop K=min(rlab demo's, updates) {b:.3f}x PureJaxRL's throughput ({lo:.2f}-{hi:.2f})")

    if "video" in only:
        vids = [bench_video(cfg) for _ in range(R)]
        fps_ratio = [500 / total / mpl for _, total, mpl in vids]
        render_s, total, mpl_fps = vids[int(np.argmax(fps_ratio))]
        print(f"video 500 frames 320x480: render + encode {total:.2f} s (render alone {render_s:.2f} s) "
              f"({500 / total:.0f} fps; matplotlib per-frame drawing: {mpl_fps:.0f} fps, ratio {max(fps_ratio):.1f}x "
              f"({_rng(fps_ratio, '.1f')})) (target: >= 5x matplotlib's frame rate)")
        if max(fps_ratio) < 5:
            failures.append("video")

    if "seeds" in only:
        t0 = time.perf_counter()
        seed_rows = bench_seeds(cfg)
        ok = sum(best >= 475 for _, best, _ in seed_rows)
        for s, best_r, final in seed_rows:
            print(f"seed {s}: best 10-update mean return {best_r:.1f}, final {final:.1f}")
        print(f"seeds reaching 475 within {cfg.total_steps} env steps: {ok}/5 (target >= 4), "
              f"{time.perf_counter() - t0:.1f} s")
        if ok < 4:
            failures.append("seeds")

    if failures:
        print("MISSED:", ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

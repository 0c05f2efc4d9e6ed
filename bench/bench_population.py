"""16 PPO CartPole seeds three ways, in the same run: one `PopulationLoop` (one `jit(vmap(ppo_step))` per call),
16 ordinary `Loop` runs one after the other, and PureJaxRL's own `jax.jit(jax.vmap(make_train(config)))` (its real
ppo.py from ../shared/peers/purejaxrl, or $PUREJAXRL_DIR; it needs `distrax`: `pip install -e '.[bench]'`).

Goals (issue 15, item 4): the population's env steps/s >= 8x the sequential runs' and >= 1.0x PureJaxRL's.
Throughput is env steps of all seeds over wall time. Two figures per row: *steady* (after the first compiled call,
i.e. without compilation) and *wall* (everything a user waits for, compilation included; 16 sequential runs
compile 16 times). The goals are checked on the steady figures; exits non-zero when one is missed.
On a CPU the members' work is the same FLOPs whichever way it is batched, so vmap gains little over sequential
runs there (the per-call and per-op overheads it removes are small next to the arithmetic); the 8x goal is an
accelerator's, where one member leaves most of the chip idle.

    python bench/bench_population.py [--seeds 16] [--total-steps 131072] [--steps-per-call 16] [--skip-sequential]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from researchlab.design.data import NoBatch
from researchlab.design.loop import Loop
from researchlab.design.population import PopulationLoop
from researchlab.examples.ppo import PPOConfig, init_ppo, ppo_step


def _two_phase(loop: Loop, first: int, rest: int) -> tuple[float, float]:
    "Seconds of `run(first)` (compiles) and of `run(rest)` (steady), each waited for."
    t0 = time.perf_counter()
    jax.block_until_ready(loop.run(first))
    t1 = time.perf_counter()
    jax.block_until_ready(loop.run(rest))
    return t1 - t0, time.perf_counter() - t1


def population(configs: list[PPOConfig], k: int) -> tuple[float, float, np.ndarray]:
    "`(first call s, steady s, final mean returns per member)` of one PopulationLoop over all seeds."
    n = configs[0].num_updates
    loop = PopulationLoop(configs, init_ppo, ppo_step, progress=False, log_every=None, steps_per_call=k)
    first, steady = _two_phase(loop, k, n - k)
    return first, steady, np.asarray(loop.state.members.return_mean)


def sequential(configs: list[PPOConfig], k: int) -> tuple[float, float, np.ndarray]:
    "The same seeds as ordinary Loops, one after the other."
    n, firsts, steadies, returns = configs[0].num_updates, 0.0, 0.0, []
    for c in configs:
        loop = Loop(c, init_ppo(c), ppo_step, NoBatch(), progress=False, log_every=None, steps_per_call=k)
        first, steady = _two_phase(loop, k, n - k)
        firsts, steadies = firsts + first, steadies + steady
        returns.append(float(loop.state.return_mean))
    return firsts, steadies, np.asarray(returns)


def purejaxrl(configs: list[PPOConfig]) -> tuple[float, float, np.ndarray] | str:
    "PureJaxRL's `jit(vmap(make_train(config)))` over the seeds: `(compile s, run s, final returns)`, or why not."
    where = Path(os.environ.get("PUREJAXRL_DIR", Path(__file__).resolve().parents[2] / "shared/peers/purejaxrl"))
    if not (where / "ppo.py").is_file():
        return f"skipped: PureJaxRL's ppo.py not found in {where} (set PUREJAXRL_DIR)"
    try:
        import distrax  # noqa: F401
    except ImportError:
        return "skipped: PureJaxRL needs distrax (pip install -e '.[bench]')"
    sys.path.insert(0, str(where))
    from ppo import make_train  # PureJaxRL's own module
    c = configs[0]
    config = {"LR": c.lr, "NUM_ENVS": c.num_envs, "NUM_STEPS": c.num_steps, "TOTAL_TIMESTEPS": c.total_steps,
              "UPDATE_EPOCHS": c.update_epochs, "NUM_MINIBATCHES": c.num_minibatches, "GAMMA": c.gamma,
              "GAE_LAMBDA": c.gae_lambda, "CLIP_EPS": c.clip_eps, "ENT_COEF": c.ent_coef, "VF_COEF": c.vf_coef,
              "MAX_GRAD_NORM": c.max_grad_norm, "ACTIVATION": "tanh", "ENV_NAME": c.env_name,
              "ANNEAL_LR": c.anneal_lr, "DEBUG": False}
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(len(configs)))
    t0 = time.perf_counter()
    train = jax.jit(jax.vmap(make_train(config))).lower(keys).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(train(keys))
    t2 = time.perf_counter()
    info = out["metrics"]  # LogWrapper info, (N, updates, steps, envs)
    done = np.asarray(info["returned_episode"][:, -1])
    rets = np.asarray(info["returned_episode_returns"][:, -1])
    final = np.where(done.any(axis=(1, 2)), (rets * done).sum(axis=(1, 2)) / np.maximum(done.sum(axis=(1, 2)), 1), 0)
    return t1 - t0, t2 - t1, final


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--total-steps", type=int, default=131_072, help="env steps per seed (512 per update)")
    parser.add_argument("--steps-per-call", type=int, default=16, help="PPO updates fused per Loop call")
    parser.add_argument("--skip-sequential", action="store_true", help="only the population and PureJaxRL rows")
    args = parser.parse_args(argv)
    configs = [PPOConfig(seed=s, total_steps=args.total_steps) for s in range(args.seeds)]
    n, k, batch = configs[0].num_updates, args.steps_per_call, configs[0].batch_size
    if n % k or n <= k:
        parser.error(f"--steps-per-call {k} must divide the {n} updates and be smaller")
    env_steps = args.seeds * n * batch
    steady_steps = args.seeds * (n - k) * batch
    print(f"{args.seeds} seeds x {n} PPO updates x {batch} env steps; {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cpus; steps_per_call={k}")
    rows: dict[str, tuple[float, float]] = {}

    def show(name: str, first: float, steady: float, returns: np.ndarray, steady_env_steps: int) -> None:
        rows[name] = (steady_env_steps / steady, env_steps / (first + steady))
        print(f"  {name:<24} steady {rows[name][0]:>10,.0f} env steps/s   wall {rows[name][1]:>10,.0f} env steps/s "
              f"(first call / compile {first:6.1f} s, rest {steady:6.1f} s)   final return mean "
              f"{np.mean(returns):6.1f}", flush=True)

    show("population (vmap)", *population(configs, k), steady_steps)
    if not args.skip_sequential:
        show("16 sequential Loops" if args.seeds == 16 else "sequential Loops", *sequential(configs, k), steady_steps)
    pjr = purejaxrl(configs)
    if isinstance(pjr, str):
        print(f"  PureJaxRL vmap(train)    {pjr}")
    else:
        show("PureJaxRL vmap(train)", *pjr, env_steps)
    pop, missed = rows["population (vmap)"], []
    if seq := next((rows[r] for r in rows if "sequential" in r), None):
        ratio = pop[0] / seq[0]
        print(f"population / sequential: {ratio:.2f}x steady, {pop[1] / seq[1]:.2f}x wall (goal >= 8x steady)")
        if ratio < 8:
            missed.append(f"population / sequential = {ratio:.2f}x < 8x")
    if "PureJaxRL vmap(train)" in rows:
        base = rows["PureJaxRL vmap(train)"]
        ratio = pop[0] / base[0]
        print(f"population / PureJaxRL: {ratio:.2f}x steady, {pop[1] / base[1]:.2f}x wall (goal >= 1.0x steady)")
        if ratio < 1.0:
            missed.append(f"population / PureJaxRL = {ratio:.2f}x < 1.0x")
    if missed:
        print("missed: " + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""16 PPO CartPole seeds three ways, in the same run: one `PopulationLoop` (one `jit(vmap(ppo_step))` per call),
16 ordinary `Loop` runs one after the other, and PureJaxRL's own `jax.jit(jax.vmap(make_train(config)))` (its real
ppo.py from ../shared/peers/purejaxrl, or $PUREJAXRL_DIR; it needs `distrax`, which `make bench` installs into
.venv-bench). A fourth, reference row: `ppo_step` scanned and vmapped in one jit, without the Loop, which splits
the population's cost into the kernel's and the Loop's.

Goals (issue 15, item 4): the population's env steps/s >= 8x the sequential runs' and >= 1.0x PureJaxRL's.
Throughput is env steps of all seeds over wall time, same hyper-parameters and the same total steps in every
row. Two figures per row: *steady* (compiled programs: a fresh run of all seeds, timed from its first call to
its last) and *wall* (everything a user waits for in a fresh process, compilation included: the first
compile plus the first round's run; 16 sequential runs compile 16 programs, one per seed, because the seed is
in their Configs). Every round runs every row once, the order rotating, so a change of load hits all rows;
each ratio is given as best (the rows' best times) and its low-high over the rounds' own ratios. Exit status 1
when a goal is missed.

The 8x goal against sequential runs holds where one run leaves most of the hardware idle (an accelerator). On
a CPU a single run's time is its arithmetic: the `8x?` line measures, in the same run, the main thread's CPU
time per compiled call of the sequential runs (the per-call cost that batching the members removes) against
the call's wall time, and the population's time per member-update against a single run's.

XLA CPU deadlock, and the flag set here: PureJaxRL's `train` builds its networks inside the jitted function, so
under `vmap` its orthogonal initialisers become batched LAPACK QR custom calls. On a 2-thread CPU pool XLA's
runtime can start two of them at once; each splits its batch into tasks on the same pool and waits for them,
with no thread left to run them, and the run never returns (every thread idle, seen with gdb: both pool
threads in `jax::ParallelBatchMap` under `QrFactorization` / `OrthogonalQr`). It happened in 2 of 2 runs of
16 seeds x 131,072 steps, and 4 of 4 runs of 200 calls of a jitted `vmap` of six 64x64 orthogonal inits;
with `--xla_cpu_enable_concurrency_optimized_scheduler=false` 0 of 4 and 0 of 2. That flag is added to
XLA_FLAGS here, before JAX starts, so every row runs under it (`--xla-default-scheduler` leaves XLA's default
and skips the PureJaxRL row).

Measured on 2026-12-02, 2-core CPU shared with other jobs, defaults (16 seeds x 131,072 steps, K=16), two runs of
3 rounds each (best, low-high over the rounds):
- load 1.2-1.5: population 169,482 env steps/s steady (140,197-169,482); 16 sequential Loops 152,544; PureJaxRL
  vmap(train) 162,949; kernel without the Loop 171,369. population / sequential 1.11x (1.04-1.11), 3.44x wall
  (54.5 s of 16 compiles); population / PureJaxRL 1.04x (0.99-1.04), 1.05x wall; population / kernel 0.99x.
  Sequential runs: 0.37 ms of main-thread CPU per call of 16 updates, 0.65 % of their wall time; 3.36 ms per
  update alone, 3.02 ms per member-update in the population.
- load 4.2-5.6: population 141,968 (115,777-141,968); sequential 128,749; PureJaxRL 119,742; kernel 132,465.
  population / sequential 1.10x (1.10-1.37), 3.70x wall; population / PureJaxRL 1.19x (1.19-1.46), 1.36x wall.
The 8x goal is missed on this CPU: batching removes a per-call cost under 1 % of a run's time, and a member's
update costs about as much inside the population as alone.

    python bench/bench_population.py [--seeds 16] [--total-steps 131072] [--steps-per-call 16] [--repeats 3]
                                     [--skip-sequential] [--xla-default-scheduler]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

_NO_CONCURRENT_QR = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "--xla-default-scheduler" not in sys.argv and _NO_CONCURRENT_QR not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_CONCURRENT_QR}".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from researchlab.design.data import NoBatch  # noqa: E402
from researchlab.design.loop import Loop  # noqa: E402
from researchlab.design.population import PopulationLoop, stack_states  # noqa: E402
from researchlab.examples.ppo import PPOConfig, PPOState, init_ppo, ppo_step  # noqa: E402

Run = Callable[[], tuple[float, float, np.ndarray]]  # a fresh run of all seeds -> (wall s, main-thread CPU s, returns)


def _timed(fn: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    t, c = time.perf_counter(), time.thread_time()
    returns = fn()
    return time.perf_counter() - t, time.thread_time() - c, returns


def prepare_population(configs: list[PPOConfig], states: list[PPOState], k: int) -> tuple[float, Run]:
    "(compile s, run): one PopulationLoop over all seeds; each run is a new PopulationLoop, which finds the program."
    n = configs[0].num_updates
    make = lambda: PopulationLoop(configs, states, ppo_step, progress=False, log_every=None, steps_per_call=k)  # noqa: E731
    t0 = time.perf_counter()
    make().precompile()
    compile_s = time.perf_counter() - t0

    def run() -> tuple[float, float, np.ndarray]:
        loop = make()

        def go() -> np.ndarray:
            jax.block_until_ready(loop.run(n))
            return np.asarray(loop.state.members.return_mean)

        out = _timed(go)
        assert loop._spec.traces == 0, "the population compiled again: the timed run is not steady"
        return out

    return compile_s, run


def prepare_sequential(configs: list[PPOConfig], states: list[PPOState], k: int) -> tuple[float, Run, list[int]]:
    "(compile s, run, calls per seed): the seeds as ordinary Loops, one after the other (one program per seed)."
    n = configs[0].num_updates
    make = lambda i: Loop(configs[i], states[i], ppo_step, NoBatch(), progress=False, log_every=None,  # noqa: E731
                          steps_per_call=k)
    t0 = time.perf_counter()
    for i in range(len(configs)):
        make(i).precompile()
    compile_s = time.perf_counter() - t0

    def run() -> tuple[float, float, np.ndarray]:
        def go() -> np.ndarray:
            returns = []
            for i in range(len(configs)):
                loop = make(i)
                jax.block_until_ready(loop.run(n))
                returns.append(float(loop.state.return_mean))
            return np.asarray(returns)

        return _timed(go)

    return compile_s, run, [-(-n // k)] * len(configs)


def prepare_kernel(configs: list[PPOConfig], states: list[PPOState]) -> tuple[float, Run]:
    "(compile s, run): `ppo_step` scanned over the whole run and vmapped over the seeds in one jit, no Loop."
    c, s0 = configs[0], stack_states(states)  # the seed is used by init_ppo only: one program for all seeds

    def train(s: PPOState) -> PPOState:
        return jax.vmap(lambda m: jax.lax.scan(lambda x, _: (ppo_step(x, c)[0], None), m, None,
                                               length=c.num_updates)[0])(s)

    t0 = time.perf_counter()
    compiled = jax.jit(train).lower(s0).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, lambda: _timed(lambda: np.asarray(jax.block_until_ready(compiled(s0)).return_mean))


def prepare_purejaxrl(configs: list[PPOConfig]) -> tuple[float, Run] | str:
    "(compile s, run) of PureJaxRL's `jit(vmap(make_train(config)))` over the seeds, or why not."
    where = Path(os.environ.get("PUREJAXRL_DIR", Path(__file__).resolve().parents[2] / "shared/peers/purejaxrl"))
    if not (where / "ppo.py").is_file():
        return f"skipped: PureJaxRL's ppo.py not found in {where} (set PUREJAXRL_DIR)"
    try:
        import distrax  # noqa: F401
    except ImportError:
        return "skipped: PureJaxRL needs distrax (make bench installs it into .venv-bench)"
    sys.path.insert(0, str(where))
    try:
        from ppo import make_train  # PureJaxRL's own module
    finally:
        sys.path.remove(str(where))
    c = configs[0]
    config = {"LR": c.lr, "NUM_ENVS": c.num_envs, "NUM_STEPS": c.num_steps, "TOTAL_TIMESTEPS": c.total_steps,
              "UPDATE_EPOCHS": c.update_epochs, "NUM_MINIBATCHES": c.num_minibatches, "GAMMA": c.gamma,
              "GAE_LAMBDA": c.gae_lambda, "CLIP_EPS": c.clip_eps, "ENT_COEF": c.ent_coef, "VF_COEF": c.vf_coef,
              "MAX_GRAD_NORM": c.max_grad_norm, "ACTIVATION": "tanh", "ENV_NAME": c.env_name,
              "ANNEAL_LR": c.anneal_lr, "DEBUG": False}
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(len(configs)))
    t0 = time.perf_counter()
    train = jax.jit(jax.vmap(make_train(config))).lower(keys).compile()
    compile_s = time.perf_counter() - t0

    def go() -> np.ndarray:
        info = jax.block_until_ready(train(keys))["metrics"]  # LogWrapper info, (N, updates, steps, envs)
        done = np.asarray(info["returned_episode"][:, -1])
        rets = np.asarray(info["returned_episode_returns"][:, -1])
        n_done = done.sum(axis=(1, 2))
        return np.where(n_done > 0, (rets * done).sum(axis=(1, 2)) / np.maximum(n_done, 1), 0.0)

    return compile_s, lambda: _timed(go)


def _lohi(xs: list[float], fmt: str = ".2f") -> str:
    return f"{min(xs):{fmt}}-{max(xs):{fmt}}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--total-steps", type=int, default=131_072, help="env steps per seed (512 per update)")
    parser.add_argument("--steps-per-call", type=int, default=16, help="PPO updates fused per Loop call")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every row once")
    parser.add_argument("--skip-sequential", action="store_true", help="only the population and PureJaxRL rows")
    parser.add_argument("--xla-default-scheduler", action="store_true",
                        help=f"do not set {_NO_CONCURRENT_QR} (PureJaxRL's row can hang: it is skipped)")
    args = parser.parse_args(argv)
    configs = [PPOConfig(seed=s, total_steps=args.total_steps) for s in range(args.seeds)]
    n, k, batch, R = configs[0].num_updates, args.steps_per_call, configs[0].batch_size, args.repeats
    env_steps = args.seeds * n * batch
    print(f"{args.seeds} seeds x {n} PPO updates x {batch} env steps = {env_steps:,} env steps per row and round; "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cpus, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"steps_per_call={k}; {R} rounds; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    states = [init_ppo(c) for c in configs]
    rows: dict[str, tuple[float, Run]] = {}
    names = {"pop": "population (vmap)", "seq": f"{args.seeds} sequential Loops", "pjr": "PureJaxRL vmap(train)",
             "kernel": "(reference) vmap(scan(ppo_step)), no Loop"}
    rows["pop"] = prepare_population(configs, states, k)
    calls = None
    if not args.skip_sequential:
        c_s, run, calls = prepare_sequential(configs, states, k)
        rows["seq"] = (c_s, run)
    if args.xla_default_scheduler:
        print(f"  {names['pjr']}: skipped (--xla-default-scheduler: it can hang, see the docstring)")
    elif isinstance(pjr := prepare_purejaxrl(configs), str):
        print(f"  {names['pjr']}: {pjr}")
    else:
        rows["pjr"] = pjr
    rows["kernel"] = prepare_kernel(configs, states)
    for key, (c_s, _) in rows.items():
        print(f"  compile {names[key]}: {c_s:.1f} s", flush=True)

    times: dict[str, list[tuple[float, float, np.ndarray]]] = {key: [] for key in rows}
    order = list(rows)
    for r in range(R):
        for key in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            times[key].append(rows[key][1]())
        print(f"  round {r + 1}: load {os.getloadavg()[0]:.1f}; " +
              ", ".join(f"{key} {times[key][-1][0]:.1f} s" for key in order), flush=True)

    wall = {key: [t for t, _, _ in ts] for key, ts in times.items()}
    for key in rows:
        best = min(wall[key])
        rets = times[key][int(np.argmin(wall[key]))][2]
        print(f"  {names[key]:<44} steady {env_steps / best:>9,.0f} env steps/s ({_lohi([env_steps / t for t in wall[key]], ',.0f')}) "
              f"wall {env_steps / (rows[key][0] + wall[key][0]):>9,.0f} env steps/s (compile {rows[key][0]:6.1f} s, "
              f"run {best:6.1f} s)   final return mean {np.mean(rets):6.1f}")
    missed = []

    def ratio(key: str, goal: float, what: str) -> None:
        per_round = [b / p for p, b in zip(wall["pop"], wall[key])]
        best = min(wall[key]) / min(wall["pop"])
        wall_r = (rows[key][0] + wall[key][0]) / (rows["pop"][0] + wall["pop"][0])
        print(f"population / {what}: {best:.2f}x steady ({_lohi(per_round)} over {R} rounds), {wall_r:.2f}x wall "
              f"(goal >= {goal}x steady)")
        if best < goal:
            missed.append(f"population / {what} = {best:.2f}x < {goal}x")

    if "seq" in rows:
        ratio("seq", 8.0, "sequential")
    if "pjr" in rows:
        ratio("pjr", 1.0, "PureJaxRL")
    kr = [b / p for p, b in zip(wall["pop"], wall["kernel"])]
    print(f"population / its kernel without the Loop: {min(wall['kernel']) / min(wall['pop']):.2f}x ({_lohi(kr)})")
    if "seq" in rows:
        cpu = [c for _, c, _ in times["seq"]]
        per_call = [c / (args.seeds * calls[0]) for c in cpu]
        frac = [c / w for c, w in zip(cpu, wall["seq"])]
        seq_update = [w / (args.seeds * n) for w in wall["seq"]]
        pop_update = [w / (args.seeds * n) for w in wall["pop"]]
        print(f"8x? sequential runs: main-thread CPU {1e3 * min(per_call):.2f} ms per compiled call of {k} updates "
              f"({_lohi([1e3 * x for x in per_call])} ms), {100 * min(frac):.2f} % of their wall time "
              f"({_lohi([100 * x for x in frac])} %): the per-call cost a population removes. One seed's update "
              f"{1e3 * min(seq_update):.2f} ms ({_lohi([1e3 * x for x in seq_update])}) alone, {1e3 * min(pop_update):.2f} "
              f"ms ({_lohi([1e3 * x for x in pop_update])}) per member in the population: the time is the members' "
              f"arithmetic, which vmap batches but does not remove")
    if missed:
        print("missed: " + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Per-step cost of `ArrayDataProvider` shuffling vs a full `jax.random.permutation` per step (same run).

The provider's batch of step t is data[pi_epoch(t*B ... t*B+B-1)]. The former implementation drew the whole
permutation of N examples inside the jitted step (a sort of N keys, every step); the current one evaluates
pi pointwise with a keyed Feistel bijection (O(B) per step). Both are jitted with the data passed as an
argument, as the Loop does, and timed per step (dispatch + compute, `block_until_ready`).

Target: the provider's step costs <= 0.1x the full-permutation step for N = 200,000, B = 256.
`python bench/bench_provider.py [--n 200000] [--batch 256] [--steps 200] [--repeats 3]`; exits 1 on a miss.
Timings on a shared machine are noisy: each figure is the best of `--repeats` alternating runs.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from researchlab.design.data import ArrayDataProvider  # noqa: E402

TARGET = 0.1


def _full_permutation_batch(data: dict, step: jax.Array, n: int, batch_size: int, seed: int) -> dict:
    "The former implementation: a permutation of all n examples per step, then a slice of it."
    spe = n // batch_size
    epoch, i = step // spe, step % spe
    perm = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
    return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)


def _per_step(fn, steps: int) -> float:  # noqa: ANN001 - a jitted callable of the step
    jax.block_until_ready(fn(jnp.int32(0)))  # compile
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        jax.block_until_ready(fn(jnp.int32(t)))
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    data = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(a.n, 8)), jnp.float32), "y": jnp.arange(a.n)}
    dp = ArrayDataProvider(data, a.batch, seed=0)
    new_jit = jax.jit(lambda p, t: p.batch_at(t))
    old_jit = jax.jit(_full_permutation_batch, static_argnums=(2, 3, 4))
    new = lambda t: new_jit(dp, t)  # noqa: E731
    old = lambda t: old_jit(data, t, a.n, a.batch, 0)  # noqa: E731
    # the two serve the same kind of batch: B distinct examples, every epoch a permutation
    assert len(set(np.asarray(new(jnp.int32(0))["y"]).tolist())) == a.batch
    old_steps = max(5, a.steps // 20)  # the baseline is slow: fewer steps give the same per-step figure
    t_new, t_old = [], []
    for _ in range(a.repeats):
        t_old.append(_per_step(old, old_steps))
        t_new.append(_per_step(new, a.steps))
    best_new, best_old = min(t_new), min(t_old)
    ratio = best_new / best_old
    print(f"ArrayDataProvider N={a.n} B={a.batch}: {best_new * 1e3:.3f} ms/step; "
          f"full permutation per step: {best_old * 1e3:.1f} ms/step; ratio {ratio:.4f} "
          f"({best_old / best_new:.0f}x faster; target ratio <= {TARGET})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

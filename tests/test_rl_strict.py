"""Every RL primitive runs under JAX's strictest settings: no implicit dtype promotion (bool masks, int
counts, float arrays mixed) and no implicit rank promotion, eagerly and under jit."""

import jax
import jax.numpy as jnp
import pytest

from researchlab.rl import (
    aggregate_loss,
    aggregate_vector_rewards,
    compute_batch_kl,
    compute_dpo_loss,
    compute_dynamic_sampling_mask,
    compute_forward_kl,
    compute_grpo_advantages,
    compute_grpo_loss,
    compute_overlong_punishment,
    compute_per_token_kl,
    compute_ppo_advantages,
    compute_ppo_loss,
    compute_reverse_kl,
    create_ema_updater,
    create_periodic_updater,
    normalize_advantages,
    normalize_rewards,
    sequence_logprobs,
    token_logprobs_and_entropy,
)

r = jax.random.normal(jax.random.key(0), (5, 3))
m = jax.random.bernoulli(jax.random.key(1), 0.7, (5, 3))  # bool masks, as users pass them
CASES = {
    "gae": lambda: compute_ppo_advantages(r, r, m, r[0]),
    "grpo_adv": lambda: compute_grpo_advantages(r, m),
    "grpo_adv_batch": lambda: compute_grpo_advantages(r, scale="batch"),
    "normalize_advantages": lambda: normalize_advantages(r, m),
    "grpo_loss": lambda: compute_grpo_loss(r, r[:, 0], m, r, r, beta=0.1, entropy_B_T=r),
    "aggregate": lambda: [aggregate_loss(r, m, a) for a in ("token", "sequence", "constant")],
    "ppo_loss": lambda: compute_ppo_loss(r, r, r, r, r, r, r, m),
    "dpo_loss": lambda: compute_dpo_loss(r[0], r[1], r[2], r[3]),
    "per_token_kl": lambda: compute_per_token_kl(r, r, m),
    "exact_kl": lambda: (compute_reverse_kl(r, r, m[:, 0]), compute_forward_kl(r, r)),
    "batch_kl": lambda: [compute_batch_kl(r, m, reduction=x) for x in ("token", "sequence", "sum")],
    "overlong": lambda: compute_overlong_punishment(jnp.arange(5), 4, 2),
    "normalize_rewards": lambda: (normalize_rewards(r, m), normalize_rewards(r, mode="batch")),
    "vector_rewards": lambda: aggregate_vector_rewards(r, [1.0, 2.0, 3.0]),
    "dynamic_sampling": lambda: compute_dynamic_sampling_mask(r, m),
    "reference": lambda: (create_ema_updater(0.9)({"w": r}, {"w": r}), create_periodic_updater(2)({"w": r}, {"w": r}, 2)),
    "token_logprobs": lambda: token_logprobs_and_entropy(r, jnp.zeros(5, jnp.int32)),
    "sequence_logprobs": lambda: sequence_logprobs(r, m),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_runs_under_strict_promotion(name):
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        out = CASES[name]()
        jitted = jax.jit(CASES[name])()
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(jitted)):
        assert bool(jnp.isfinite(a).all()) and bool(jnp.allclose(a, b, atol=1e-6))

"""Reward aggregation, normalization, shaping, DAPO overlong punishment and dynamic sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from researchlab.rl import (
    aggregate_vector_rewards,
    apply_reward_shaping,
    compute_dynamic_sampling_mask,
    compute_overlong_punishment,
    create_overlong_shaping,
    normalize_rewards,
)


def overlong_numpy(L, l_max, l_cache):
    "DAPO eq. 13, case by case."
    if L <= l_max - l_cache:
        return 0.0
    if L <= l_max:
        return ((l_max - l_cache) - L) / l_cache
    return -1.0


@settings(max_examples=30, deadline=None)
@given(l_max=st.integers(2, 64), data=st.data())
def test_overlong_punishment_matches_piecewise_definition(l_max, data):
    l_cache = data.draw(st.integers(1, l_max))
    lengths = np.arange(0, 70)  # one shape for every example: no recompilation
    got = np.asarray(compute_overlong_punishment(jnp.asarray(lengths), l_max, l_cache))
    np.testing.assert_allclose(got, [overlong_numpy(L, l_max, l_cache) for L in lengths], rtol=1e-6, atol=1e-6)
    assert np.all(np.diff(got) <= 1e-7) and got.min() >= -1.0  # monotone, bounded


def test_vector_rewards_and_shaping():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 4, 2)).astype(np.float32)  # [P, G, K]
    w = np.array([0.7, 0.3])
    np.testing.assert_allclose(aggregate_vector_rewards(jnp.asarray(r), w),
                               [[sum(r[p, g, k] * w[k] for k in range(2)) for g in range(4)] for p in range(3)], rtol=1e-5)
    gate = aggregate_vector_rewards(jnp.asarray(r), aggregator=lambda x: x[..., 0] * (x[..., 1] > 0))
    np.testing.assert_allclose(gate, r[..., 0] * (r[..., 1] > 0))
    shaped = jax.jit(lambda rew, L: apply_reward_shaping(rew, [create_overlong_shaping(10, 4)], {"lengths": L}))(
        jnp.ones(4), jnp.array([3, 7, 10, 12]))
    np.testing.assert_allclose(shaped, [1.0, 1 - 0.25, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"weights_K \(3,\)"):
        aggregate_vector_rewards(jnp.asarray(r), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights_K or aggregator"):
        aggregate_vector_rewards(jnp.asarray(r), w, aggregator=lambda x: x.sum(-1))
    with pytest.raises(ValueError, match=r"hook 1 \(<lambda>\)"):
        apply_reward_shaping(jnp.ones(3), [lambda x, f: x, lambda x, f: x.sum()])
    with pytest.raises(ValueError, match=r"overlong_shaping.*lengths \(2,\)"):
        apply_reward_shaping(jnp.ones(3), create_overlong_shaping(10, 4), {"lengths": jnp.ones(2)})


def test_normalize_rewards_group_and_batch():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(4, 6)).astype(np.float32)
    r[1] = 2.0  # a constant group
    g = np.asarray(normalize_rewards(jnp.asarray(r)))
    for p in range(4):
        expected = (r[p] - r[p].mean()) / (r[p].std() + 1e-8)
        np.testing.assert_allclose(g[p], expected, rtol=1e-4, atol=1e-5)
    assert np.all(g[1] == 0.0)
    b = np.asarray(normalize_rewards(jnp.asarray(r), mode="batch"))
    np.testing.assert_allclose(b, (r - r.mean()) / (r.std() + 1e-8), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'column'"):
        normalize_rewards(jnp.asarray(r), mode="column")
    with pytest.raises(ValueError, match=r"rewards is empty"):
        normalize_rewards(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"mask \(4, 5\)"):
        normalize_rewards(jnp.asarray(r), jnp.ones((4, 5)))


def test_dynamic_sampling_mask_and_vmap():
    r = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.5, 0.5, 0.7]])
    np.testing.assert_array_equal(compute_dynamic_sampling_mask(r), [False, True, True])
    np.testing.assert_array_equal(compute_dynamic_sampling_mask(r, atol=0.3), [False, True, False])
    np.testing.assert_array_equal(compute_dynamic_sampling_mask(r, jnp.array([[1, 1, 1], [0, 1, 1], [0, 0, 0]])),
                                  [False, False, False])
    stacked = jnp.stack([r, r[::-1]])
    batched = jax.jit(jax.vmap(compute_dynamic_sampling_mask))(stacked)
    for n in range(2):
        np.testing.assert_array_equal(batched[n], compute_dynamic_sampling_mask(stacked[n]))
    with pytest.raises(ValueError, match=r"rewards_P_G must have 2 axes.*\(3,\)"):
        compute_dynamic_sampling_mask(jnp.ones(3))

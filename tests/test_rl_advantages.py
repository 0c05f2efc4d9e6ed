"""Advantages (GAE, GRPO, normalization) against independent NumPy loops, rlax's published GAE values and
hypothesis properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from researchlab.rl import compute_grpo_advantages, compute_ppo_advantages, normalize_advantages

# ---- GAE ---------------------------------------------------------------------------------------


def gae_numpy(rewards, values, dones, last_value, gamma, lam):
    "Textbook GAE with explicit Python loops over time and environments (time-major [T, E])."
    T, E = rewards.shape
    adv = np.zeros((T, E))
    for e in range(E):
        running = 0.0
        for t in reversed(range(T)):
            next_v = last_value[e] if t == T - 1 else values[t + 1, e]
            nonterminal = 1.0 - float(dones[t, e])
            delta = rewards[t, e] + gamma * next_v * nonterminal - values[t, e]
            running = delta + gamma * lam * nonterminal * running
            adv[t, e] = running
    return adv, adv + values


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.0])
def test_gae_matches_numpy_loop(lam):
    rng = np.random.default_rng(0)
    T, E = 9, 5
    r, v = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    d, lv = rng.random((T, E)) < 0.25, rng.normal(size=E)
    exp_adv, exp_tgt = gae_numpy(r, v, d, lv, 0.97, lam)
    adv, tgt = jax.jit(compute_ppo_advantages)(jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32),
                                               jnp.asarray(d), jnp.asarray(lv, jnp.float32), 0.97, lam)
    np.testing.assert_allclose(adv, exp_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tgt, exp_tgt, rtol=1e-5, atol=1e-5)


# Values from rlax's published test, TruncatedGeneralizedAdvantageEstimationTest in
# https://github.com/google-deepmind/rlax/blob/master/rlax/_src/multistep_test.py
# rlax takes values with T+1 entries (the last is the bootstrap) and per-step discounts; its
# discount_t rows are gamma * (1 - done): row 0 is gamma 0.99 with no episode end, row 1 is gamma 0.9
# with an episode end at step 3 (discount 0.0).
RLAX_R = np.array([[0.0, 0.0, 1.0, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0, 1.0]])
RLAX_V = np.array([[1.0, 4.0, -3.0, -2.0, -1.0, -1.0], [-3.0, -2.0, -1.0, 0.0, 5.0, -1.0]])
RLAX_GAMMA = np.array([0.99, 0.9])
RLAX_DONES = np.array([[0, 0, 0, 0, 0], [0, 0, 0, 1, 0]], bool)
RLAX_EXPECTED = {
    1.0: [[-1.45118, -4.4557, 2.5396, 0.5249, -0.49], [3.0, 2.0, 1.0, 0.0, -4.9]],
    0.7: [[-0.676979, -5.248167, 2.4846, 0.6704, -0.49], [2.2899, 1.73, 1.0, 0.0, -4.9]],
    0.4: [[0.56731, -6.042, 2.3431, 0.815, -0.49], [1.725, 1.46, 1.0, 0.0, -4.9]],
}


@pytest.mark.parametrize("lam", sorted(RLAX_EXPECTED))
def test_gae_rlax_published_values(lam):
    # time-major [T, E] with a per-environment gamma of shape [E]
    adv, _ = compute_ppo_advantages(jnp.asarray(RLAX_R.T, jnp.float32), jnp.asarray(RLAX_V[:, :-1].T, jnp.float32),
                                    jnp.asarray(RLAX_DONES.T), jnp.asarray(RLAX_V[:, -1], jnp.float32),
                                    gamma=jnp.asarray(RLAX_GAMMA, jnp.float32), lam=lam)
    np.testing.assert_allclose(adv.T, np.array(RLAX_EXPECTED[lam]), atol=1e-3)
    # the same through vmap over environments (each row time-major [T])
    per_env = jax.vmap(compute_ppo_advantages, in_axes=(0, 0, 0, 0, 0, None))
    adv_v, _ = per_env(jnp.asarray(RLAX_R, jnp.float32), jnp.asarray(RLAX_V[:, :-1], jnp.float32),
                       jnp.asarray(RLAX_DONES), jnp.asarray(RLAX_V[:, -1], jnp.float32),
                       jnp.asarray(RLAX_GAMMA, jnp.float32), lam)
    np.testing.assert_allclose(adv_v, np.array(RLAX_EXPECTED[lam]), atol=1e-3)


def test_gae_extra_trailing_axes_and_vmap_equals_loop():
    key = jax.random.key(3)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shape = (7, 3, 2)  # [T, E, A]: any trailing batch axes
    r, v = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
    d, lv = jax.random.bernoulli(k3, 0.2, shape), jax.random.normal(k4, shape[1:])
    adv, tgt = compute_ppo_advantages(r, v, d, lv)
    gae = jax.jit(compute_ppo_advantages)
    for e in range(3):
        for a in range(2):
            ea, et = gae(r[:, e, a], v[:, e, a], d[:, e, a], lv[e, a])
            np.testing.assert_allclose(adv[:, e, a], ea, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(tgt[:, e, a], et, rtol=1e-5, atol=1e-6)


def test_gae_bad_inputs_name_the_argument():
    r = jnp.zeros((5, 2))
    with pytest.raises(ValueError, match=r"dones_T_E \(5, 3\)"):
        compute_ppo_advantages(r, r, jnp.zeros((5, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"last_value_E \(5, 2\)"):
        compute_ppo_advantages(r, r, r, r)
    with pytest.raises(ValueError, match="time axis"):
        compute_ppo_advantages(jnp.zeros((0, 2)), jnp.zeros((0, 2)), jnp.zeros((0, 2)), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"gamma"):
        compute_ppo_advantages(r, r, r, jnp.zeros(2), gamma=jnp.ones(3))


# ---- GRPO advantages ---------------------------------------------------------------------------


def grpo_numpy(rewards, scale, eps=1e-4):
    "Loop over groups: centre on the group mean, divide by the unbiased group/batch std (or nothing)."
    out = np.zeros_like(rewards, dtype=np.float64)
    batch_std = np.std(rewards, ddof=1) if rewards.size > 1 else 0.0
    for p in range(rewards.shape[0]):
        g = rewards[p].astype(np.float64)
        mean = sum(g) / len(g)
        std = np.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1)) if len(g) > 1 else 0.0
        for j in range(len(g)):
            denom = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out[p, j] = (g[j] - mean) / denom
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_numpy_loop(scale):
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(6, 8)).astype(np.float32)
    rewards[2] = 1.0  # a degenerate group
    got = jax.jit(compute_grpo_advantages, static_argnames="scale")(jnp.asarray(rewards), scale=scale)
    np.testing.assert_allclose(got, grpo_numpy(rewards, scale), rtol=1e-4, atol=1e-5)


# a few fixed shapes (G = 1 included) so jit compiles a handful of times, not once per example
rewards_strategy = st.sampled_from([(1, 1), (3, 1), (2, 2), (4, 5)]).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
_grpo = jax.jit(compute_grpo_advantages, static_argnames=("scale",))


@settings(max_examples=40, deadline=None)
@given(rewards=rewards_strategy, scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_advantages_zero_mean_per_group_and_finite(rewards, scale):
    adv = np.asarray(_grpo(jnp.asarray(rewards), scale=scale))
    assert np.all(np.isfinite(adv))
    scale_ = np.maximum(1.0, np.abs(rewards).max()) if scale == "none" else 1.0
    np.testing.assert_allclose(adv.mean(axis=1) / scale_, 0.0, atol=1e-3)
    if rewards.shape[1] == 1:
        assert np.all(adv == 0.0)  # group size 1: documented zero advantage


@settings(max_examples=25, deadline=None)
@given(rewards=rewards_strategy, data=st.data())
def test_grpo_masked_zero_mean_and_padding_zero(rewards, data):
    mask = data.draw(hnp.arrays(np.bool_, rewards.shape))
    adv = np.asarray(_grpo(jnp.asarray(rewards), jnp.asarray(mask)))
    assert np.all(np.isfinite(adv))
    assert np.all(adv[~mask] == 0.0)
    np.testing.assert_allclose((adv * mask).sum(axis=1), 0.0, atol=1e-2)


def test_grpo_jit_vmap_equals_python_loop():
    rewards_N_P_G = jax.random.normal(jax.random.key(0), (4, 3, 5))
    batched = jax.jit(jax.vmap(compute_grpo_advantages))(rewards_N_P_G)
    for n in range(4):
        np.testing.assert_allclose(batched[n], compute_grpo_advantages(rewards_N_P_G[n]), rtol=1e-5, atol=1e-6)


def test_grpo_bad_inputs():
    with pytest.raises(ValueError, match=r"rewards_P_G is empty.*\(3, 0\)"):
        compute_grpo_advantages(jnp.zeros((3, 0)))
    with pytest.raises(ValueError, match=r"rewards_P_G is empty.*\(0, 4\)"):
        compute_grpo_advantages(jnp.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"mask_P_G \(3, 5\)"):
        compute_grpo_advantages(jnp.zeros((3, 4)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=r"2 axes.*\(12,\)"):
        compute_grpo_advantages(jnp.zeros(12))
    # group size 1 and all-equal groups: finite zeros, never NaN
    np.testing.assert_array_equal(compute_grpo_advantages(jnp.array([[1.0], [2.0]])), np.zeros((2, 1)))
    np.testing.assert_array_equal(compute_grpo_advantages(jnp.full((2, 3), 4.0), scale="batch"), np.zeros((2, 3)))


# ---- normalization -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(adv=st.sampled_from([(1,), (7,), (2, 3)]).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32))), data=st.data())
def test_normalize_advantages_masked(adv, data):
    mask = data.draw(hnp.arrays(np.bool_, adv.shape))
    out = np.asarray(jax.jit(normalize_advantages)(jnp.asarray(adv), jnp.asarray(mask)))
    assert np.all(np.isfinite(out)) and np.all(out[~mask] == 0.0)
    if mask.sum() > 1 and np.std(adv[mask].astype(np.float64)) > 1e-2:
        np.testing.assert_allclose(out[mask].mean(), 0.0, atol=1e-4)
        np.testing.assert_allclose(out[mask].std(), 1.0, atol=1e-3)


def test_normalize_advantages_bad_shapes():
    with pytest.raises(ValueError, match=r"advantages \(4,\), mask \(3,\)"):
        normalize_advantages(jnp.zeros(4), jnp.ones(3))


def test_gae_jit_vmap_equals_python_loop():
    k = jax.random.split(jax.random.key(11), 4)
    N, T, E = 3, 8, 2  # vmap over N independent rollouts (e.g. seeds), each time-major [T, E]
    r, v = jax.random.normal(k[0], (N, T, E)), jax.random.normal(k[1], (N, T, E))
    d, lv = jax.random.bernoulli(k[2], 0.2, (N, T, E)), jax.random.normal(k[3], (N, E))
    adv_b, tgt_b = jax.jit(jax.vmap(compute_ppo_advantages, in_axes=(0, 0, 0, 0, None, None)))(r, v, d, lv, 0.9, 0.8)
    for n in range(N):
        adv, tgt = compute_ppo_advantages(r[n], v[n], d[n], lv[n], 0.9, 0.8)
        np.testing.assert_allclose(adv_b[n], adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tgt_b[n], tgt, rtol=1e-5, atol=1e-6)

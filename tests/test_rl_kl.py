"""KL estimators and exact categorical KL: NumPy references and hypothesis properties."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from researchlab.rl import (
    compute_batch_kl,
    compute_forward_kl,
    compute_per_token_kl,
    compute_reverse_kl,
    create_adaptive_kl,
    create_truncated_kl,
    update_kl_coef,
)


def kl_numpy(p, q):
    "KL(p || q) by a loop over outcomes."
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def test_exact_kl_matches_numpy_loop():
    rng = np.random.default_rng(0)
    logits, ref = rng.normal(size=(3, 4, 7)), rng.normal(size=(3, 4, 7))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    q = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    rev = compute_reverse_kl(jnp.asarray(logits, jnp.float32), jnp.asarray(ref, jnp.float32))
    fwd = compute_forward_kl(jnp.asarray(logits, jnp.float32), jnp.asarray(ref, jnp.float32))
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(rev[i, j], kl_numpy(p[i, j], q[i, j]), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(fwd[i, j], kl_numpy(q[i, j], p[i, j]), rtol=1e-4, atol=1e-6)
    mask = jnp.asarray(rng.random((3, 4)) < 0.5)
    masked = compute_reverse_kl(jnp.asarray(logits, jnp.float32), jnp.asarray(ref, jnp.float32), mask)
    np.testing.assert_array_equal(np.asarray(masked)[~np.asarray(mask)], 0.0)


logit_vectors = hnp.arrays(np.float32, (5,), elements=st.floats(-4, 4, width=32))


@settings(max_examples=15, deadline=None)
@given(logits=logit_vectors, ref_logits=logit_vectors, seed=st.integers(0, 2**31 - 1))
def test_k3_nonnegative_and_its_mean_matches_exact_kl(logits, ref_logits, seed):
    exact, k1, k2, k3 = _sampled_estimates(jnp.asarray(logits), jnp.asarray(ref_logits), jax.random.key(seed))
    assert float(k3.min()) >= 0.0 and float(k2.min()) >= 0.0
    n = k3.shape[0]
    for est in (k3, k1):  # both unbiased for KL(pi || pi_ref); tolerance: 6 standard errors
        tol = 6 * float(est.std()) / math.sqrt(n) + 1e-4
        assert abs(float(est.mean()) - float(exact)) <= tol, (float(est.mean()), float(exact), tol)


@jax.jit
def _sampled_estimates(logits, ref_logits, key):
    y = jax.random.categorical(key, logits, shape=(20_000,))
    lp, ref_lp = jax.nn.log_softmax(logits)[y], jax.nn.log_softmax(ref_logits)[y]
    return (compute_reverse_kl(logits, ref_logits), compute_per_token_kl(lp, ref_lp, estimator="k1"),
            compute_per_token_kl(lp, ref_lp, estimator="k2"), compute_per_token_kl(lp, ref_lp, estimator="k3"))


@settings(max_examples=40, deadline=None)
@given(pair=hnp.arrays(np.float32, (2, 8), elements=st.floats(-30, 0, width=32)))
def test_k3_is_nonnegative_elementwise(pair):
    k3 = _k3(jnp.asarray(pair[0]), jnp.asarray(pair[1]))
    assert bool((k3 >= 0).all())


_k3 = jax.jit(functools.partial(compute_per_token_kl, estimator="k3"))


def test_exact_kl_properties():
    logits = jax.random.normal(jax.random.key(1), (4, 6))
    ref = jax.random.normal(jax.random.key(2), (4, 6))
    assert bool((compute_reverse_kl(logits, ref) > 0).all())
    np.testing.assert_allclose(compute_reverse_kl(logits, logits), 0.0, atol=1e-6)
    np.testing.assert_allclose(compute_forward_kl(logits, ref), compute_reverse_kl(ref, logits), rtol=1e-6)
    # -inf logits: zero-probability outcomes contribute nothing; KL against an impossible outcome is inf
    assert float(compute_reverse_kl(jnp.array([0.0, -jnp.inf]), jnp.array([0.0, 0.0]))) == pytest.approx(math.log(2))
    assert math.isinf(float(compute_reverse_kl(jnp.array([0.0, 0.0]), jnp.array([0.0, -jnp.inf]))))


def test_builders_and_batch_reduction_match_numpy():
    rng = np.random.default_rng(3)
    lp, ref = rng.normal(-2, 1, (4, 6)), rng.normal(-2, 1, (4, 6))
    mask = rng.random((4, 6)) < 0.6
    mask[2] = False  # an empty sequence
    k3 = np.exp(ref - lp) - 1 - (ref - lp)
    trunc = compute_per_token_kl(jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(mask), estimator=create_truncated_kl(0.3))
    np.testing.assert_allclose(trunc, np.where(mask, np.minimum(k3, 0.3), 0), rtol=1e-5, atol=1e-6)
    gated = compute_per_token_kl(jnp.asarray(lp), jnp.asarray(ref), estimator=create_adaptive_kl(0.2))
    np.testing.assert_allclose(gated, np.where(np.exp(ref) >= 0.2, k3, 0), rtol=1e-5, atol=1e-6)
    kl = jnp.asarray(k3, jnp.float32)
    np.testing.assert_allclose(compute_batch_kl(kl, jnp.asarray(mask)), k3[mask].mean(), rtol=1e-5)
    per_seq = [k3[b][mask[b]].mean() if mask[b].any() else 0.0 for b in range(4)]
    np.testing.assert_allclose(compute_batch_kl(kl, jnp.asarray(mask), reduction="sequence"), np.mean(per_seq), rtol=1e-5)
    np.testing.assert_allclose(compute_batch_kl(kl, jnp.asarray(mask), reduction="sum"),
                               np.mean([k3[b][mask[b]].sum() for b in range(4)]), rtol=1e-5)


def test_jit_vmap_equals_python_loop():
    k = jax.random.split(jax.random.key(5), 3)
    logits, ref = jax.random.normal(k[0], (3, 4, 5, 6)), jax.random.normal(k[1], (3, 4, 5, 6))
    mask = jax.random.bernoulli(k[2], 0.7, (3, 4, 5))
    lp, ref_lp = jax.nn.log_softmax(logits)[..., 0], jax.nn.log_softmax(ref)[..., 0]
    for f, args in ((compute_reverse_kl, (logits, ref, mask)), (compute_forward_kl, (logits, ref, mask)),
                    (compute_per_token_kl, (lp, ref_lp, mask)),
                    (lambda a, b, m: compute_batch_kl(compute_per_token_kl(a, b, m), m), (lp, ref_lp, mask))):
        batched = jax.jit(jax.vmap(f))(*args)
        for n in range(3):
            np.testing.assert_allclose(batched[n], jax.jit(f)(*(a[n] for a in args)), rtol=1e-5, atol=1e-6)


def test_adaptive_kl_coefficient_moves_towards_target():
    coef = 0.1
    for _ in range(5):
        coef = update_kl_coef(coef, observed_kl=1.0, target=0.1, horizon=100, n_steps=10)
    np.testing.assert_allclose(coef, 0.1 * 1.02**5, rtol=1e-5)
    assert float(update_kl_coef(0.1, 0.0, target=0.1, horizon=100, n_steps=10)) < 0.1
    with pytest.raises(ValueError, match="target"):
        update_kl_coef(0.1, 0.0, target=0.0)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"compute_per_token_kl.*ref_logprobs_B_T \(2, 4\)"):
        compute_per_token_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"mask_B_T \(3, 2\)"):
        compute_per_token_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"'k9'"):
        compute_per_token_kl(jnp.zeros(2), jnp.zeros(2), estimator="k9")
    with pytest.raises(ValueError, match=r"logits_B_T_V \(2, 0\)"):
        compute_reverse_kl(jnp.zeros((2, 0)), jnp.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"kl_B_T must have 2 axes.*\(5,\)"):
        compute_batch_kl(jnp.zeros(5))
    with pytest.raises(ValueError, match="threshold"):
        create_truncated_kl(-1.0)

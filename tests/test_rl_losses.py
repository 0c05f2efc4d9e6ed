"""Policy losses against NumPy loop references, and hypothesis properties of the clipped surrogate."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from researchlab.rl import (
    aggregate_loss,
    compute_dapo_loss,
    compute_dpo_loss,
    compute_grpo_loss,
    compute_ppo_loss,
    sequence_logprobs,
    token_logprobs_and_entropy,
)

# ---- independent references (plain Python loops) -----------------------------------------------


def ppo_numpy(lp, old_lp, adv, v, old_v, tgt, ent, mask, clip, vclip, vf, ec, norm):
    idx = [i for i in range(len(lp)) if mask[i]]
    n = len(idx)
    a = np.array(adv, np.float64)
    if norm:
        mu = sum(a[i] for i in idx) / n
        sd = math.sqrt(sum((a[i] - mu) ** 2 for i in idx) / n)
        a = (a - mu) / (sd + 1e-8)
    pol = val = en = 0.0
    for i in idx:
        ratio = math.exp(lp[i] - old_lp[i])
        pol += -min(ratio * a[i], min(max(ratio, 1 - clip), 1 + clip) * a[i])
        err = (v[i] - tgt[i]) ** 2
        if vclip is not None:
            vc = old_v[i] + min(max(v[i] - old_v[i], -vclip), vclip)
            err = max(err, (vc - tgt[i]) ** 2)
        val += 0.5 * err
        en += ent[i]
    pol, val, en = pol / n, val / n, en / n
    return pol + vf * val - ec * en, pol, val


def grpo_numpy(lp, old_lp, ref_lp, adv, mask, eps_low, eps_high, beta, agg, t_max):
    B, T = lp.shape
    per_seq, total, count = [], 0.0, 0
    for b in range(B):
        s, c = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = math.exp(lp[b, t] - old_lp[b, t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            loss = -min(ratio * adv[b], clipped * adv[b])
            log_r = ref_lp[b, t] - lp[b, t]
            loss += beta * (math.exp(log_r) - 1 - log_r)
            s, c = s + loss, c + 1
        per_seq.append(s / max(c, 1))
        total, count = total + s, count + c
    if agg == "sequence":
        return sum(per_seq) / B
    if agg == "token":
        return total / max(count, 1)
    return total / (B * t_max)


def dpo_numpy(c, r, rc, rr, beta, ls):
    out = 0.0
    for i in range(len(c)):
        z = beta * ((c[i] - rc[i]) - (r[i] - rr[i]))
        out += -(1 - ls) * math.log(1 / (1 + math.exp(-z))) - ls * math.log(1 / (1 + math.exp(z)))
    return out / len(c)


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize("vclip,norm", [(0.2, True), (None, False), (0.05, False)])
def test_ppo_loss_matches_numpy(vclip, norm):
    rng = np.random.default_rng(0)
    n = 64
    old_lp = rng.normal(-1.0, 0.3, n)
    lp = old_lp + rng.normal(0, 0.3, n)  # many ratios outside [0.8, 1.2]
    adv, v, old_v, tgt, ent = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n), rng.normal(size=n), rng.random(n)
    mask = rng.random(n) < 0.8
    exp_total, exp_pol, exp_val = ppo_numpy(lp, old_lp, adv, v, old_v, tgt, ent, mask, 0.2, vclip, 0.5, 0.01, norm)
    f = jax.jit(compute_ppo_loss, static_argnames=("clip_value_eps", "normalize_advantages"))
    total, d = f(*_f32(lp, old_lp, adv, v, old_v, tgt, ent), jnp.asarray(mask), clip_value_eps=vclip,
                 normalize_advantages=norm)
    np.testing.assert_allclose([total, d["policy_loss"], d["value_loss"]], [exp_total, exp_pol, exp_val],
                               rtol=1e-4, atol=1e-5)
    ratio = np.exp(lp - old_lp)[mask]
    assert 0.05 < float(d["clip_fraction"]) <= float(np.mean((ratio < 0.8) | (ratio > 1.2))) + 1e-6


@pytest.mark.parametrize("agg", ["sequence", "token", "constant"])
@pytest.mark.parametrize("eps_high,beta", [(0.2, 0.0), (0.28, 0.04)])
def test_grpo_loss_matches_numpy(agg, eps_high, beta):
    rng = np.random.default_rng(1)
    B, T = 6, 9
    old_lp = rng.normal(-2.0, 0.5, (B, T))
    lp = old_lp + rng.normal(0, 0.25, (B, T))
    ref_lp = old_lp + rng.normal(0, 0.25, (B, T))
    adv = rng.normal(size=B)
    lengths = np.array([9, 1, 4, 7, 0, 3])  # includes an empty completion
    mask = np.arange(T)[None, :] < lengths[:, None]
    expected = grpo_numpy(lp, old_lp, ref_lp, adv, mask, 0.2, eps_high, beta, agg, 12)
    f = jax.jit(compute_grpo_loss, static_argnames=("beta", "eps_low", "eps_high", "loss_agg", "max_length"))
    loss, d = f(*_f32(lp, adv), jnp.asarray(mask), *_f32(old_lp, ref_lp), beta=beta, eps_low=0.2, eps_high=eps_high,
                loss_agg=agg, max_length=12)
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-6)
    assert all(np.isfinite(float(x)) for x in d.values())


def test_dapo_defaults_are_clip_higher_token_level():
    rng = np.random.default_rng(2)
    lp, old_lp, adv = rng.normal(-2, 0.3, (4, 5)), rng.normal(-2, 0.3, (4, 5)), rng.normal(size=4)
    mask = rng.random((4, 5)) < 0.7
    loss, _ = compute_dapo_loss(*_f32(lp, adv), jnp.asarray(mask), *_f32(old_lp))
    np.testing.assert_allclose(loss, grpo_numpy(lp, old_lp, lp, adv, mask, 0.2, 0.28, 0.0, "token", 5), rtol=1e-4)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpo_loss_matches_numpy(ls):
    rng = np.random.default_rng(3)
    c, r, rc, rr = (rng.normal(-20, 3, 16) for _ in range(4))
    loss, d = compute_dpo_loss(*_f32(c, r, rc, rr), beta=0.2, label_smoothing=ls)
    np.testing.assert_allclose(loss, dpo_numpy(c, r, rc, rr, 0.2, ls), rtol=1e-4)
    z = 0.2 * ((c - rc) - (r - rr))
    np.testing.assert_allclose(d["reward_accuracy"], np.mean(z > 0), rtol=1e-6)
    np.testing.assert_allclose(d["reward_margin"], z.mean(), rtol=1e-3, atol=1e-5)


def test_dpo_gradient_raises_chosen_lowers_rejected():
    c, r, rc, rr = _f32([-5.0], [-5.0], [-5.0], [-5.0])
    gc, gr = jax.grad(lambda a, b: compute_dpo_loss(a, b, rc, rr)[0], argnums=(0, 1))(c, r)
    assert float(gc[0]) < 0 < float(gr[0])  # descending the loss raises log p(chosen), lowers log p(rejected)


# ---- properties of the clipped surrogate ---------------------------------------------------------

log_ratios = st.floats(-1.0, 1.0, width=32)
advs = st.floats(-5.0, 5.0, width=32).filter(lambda a: abs(a) > 1e-3)


@functools.partial(jax.jit, static_argnums=(3, 4))
@functools.partial(jax.value_and_grad)
def _token_loss_and_grad(lp, old, adv, eps_low, eps_high):
    "compute_grpo_loss on a single token: B = T = 1."
    return compute_grpo_loss(lp.reshape(1, 1), adv.reshape(1), jnp.ones((1, 1)), old.reshape(1, 1),
                             eps_low=eps_low, eps_high=eps_high)[0]


@settings(max_examples=60, deadline=None)
@given(log_ratio=log_ratios, adv=advs, eps_low=st.sampled_from([0.1, 0.2]), eps_high=st.sampled_from([0.2, 0.28]))
def test_clipped_equals_unclipped_inside_and_zero_grad_outside(log_ratio, adv, eps_low, eps_high):
    old = jnp.float32(-1.3)
    lp = old + jnp.float32(log_ratio)
    a = jnp.float32(adv)
    ratio = math.exp(float(lp - old))
    loss, grad = _token_loss_and_grad(lp, old, a, eps_low, eps_high)
    if 1 - eps_low + 1e-4 < ratio < 1 + eps_high - 1e-4:  # inside the trust region: the plain surrogate
        np.testing.assert_allclose(loss, -ratio * adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, -ratio * adv, rtol=1e-5, atol=1e-6)  # d(-rho A)/dlogp = -rho A
    elif (ratio > 1 + eps_high + 1e-4 and adv > 0) or (ratio < 1 - eps_low - 1e-4 and adv < 0):
        assert float(grad) == 0.0  # clipped in the direction the advantage pushes: no gradient
        clip_at = 1 + eps_high if adv > 0 else 1 - eps_low
        np.testing.assert_allclose(loss, -clip_at * adv, rtol=1e-5)
    elif abs(ratio - 1) > max(eps_low, eps_high) + 1e-4:  # outside, but the unclipped term is the minimum
        np.testing.assert_allclose(grad, -ratio * adv, rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _grpo_grad(lp, adv, mask, old, ref, beta, agg):
    return jax.grad(lambda x: compute_grpo_loss(x, adv, mask, old, ref, beta=beta, loss_agg=agg)[0])(lp)


@jax.jit
def _ppo_grad(lp, vals, old, ref, mask):
    return jax.grad(lambda x, v: compute_ppo_loss(x, old, ref, v, vals, vals * 0.5, lp, mask)[0], argnums=(0, 1))(lp, vals)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), agg=st.sampled_from(["sequence", "token", "constant"]),
       beta=st.sampled_from([0.0, 0.1]))
def test_masked_tokens_get_zero_gradient(seed, agg, beta):
    k = jax.random.split(jax.random.key(seed), 5)
    B, T = 3, 6
    lp = jax.random.normal(k[0], (B, T)) - 2.0
    old, ref = lp + 0.1 * jax.random.normal(k[1], (B, T)), lp + 0.1 * jax.random.normal(k[2], (B, T))
    mask = jax.random.bernoulli(k[3], 0.6, (B, T))
    lp_pad = jnp.where(mask, lp, -jnp.inf)  # padding as -inf log-probs, a common way to pad
    adv = jax.random.normal(k[4], (B,))
    g = _grpo_grad(lp_pad, adv, mask, old, ref, beta, agg)
    assert bool(jnp.isfinite(g).all())
    np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)
    # PPO: masked samples get no gradient through logprobs or values
    gp, gv = _ppo_grad(lp, jax.random.normal(k[0], (B, T)), old, ref, mask)
    np.testing.assert_array_equal(np.asarray(gp)[~np.asarray(mask)], 0.0)
    np.testing.assert_array_equal(np.asarray(gv)[~np.asarray(mask)], 0.0)


def test_jit_vmap_equals_python_loop():
    k = jax.random.split(jax.random.key(7), 4)
    N, B, T = 3, 4, 5
    lp = jax.random.normal(k[0], (N, B, T)) - 2
    old = lp + 0.2 * jax.random.normal(k[1], (N, B, T))
    adv = jax.random.normal(k[2], (N, B))
    mask = jax.random.bernoulli(k[3], 0.7, (N, B, T))
    for fn in (compute_grpo_loss, compute_dapo_loss):
        batched_loss, batched_diag = jax.jit(jax.vmap(fn))(lp, adv, mask, old, old)
        for n in range(N):
            loss, diag = jax.jit(fn)(lp[n], adv[n], mask[n], old[n], old[n])
            np.testing.assert_allclose(batched_loss[n], loss, rtol=1e-5, atol=1e-6)
            for key in diag:
                np.testing.assert_allclose(batched_diag[key][n], diag[key], rtol=1e-5, atol=1e-6)
    ppo_b, _ = jax.jit(jax.vmap(compute_ppo_loss))(lp, old, lp * 0 + 1, old, old, lp, lp, mask)
    for n in range(N):
        np.testing.assert_allclose(ppo_b[n], jax.jit(compute_ppo_loss)(lp[n], old[n], lp[n] * 0 + 1, old[n], old[n], lp[n],
                                                              lp[n], mask[n])[0], rtol=1e-5, atol=1e-6)
    dpo_b, _ = jax.jit(jax.vmap(compute_dpo_loss))(adv, adv * 2, adv * 0, adv * 0)
    for n in range(N):
        np.testing.assert_allclose(dpo_b[n], compute_dpo_loss(adv[n], adv[n] * 2, adv[n] * 0, adv[n] * 0)[0], rtol=1e-5)


# ---- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    lp, mask = jnp.zeros((2, 4)), jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"compute_grpo_loss.*mask_B_T \(2, 5\)"):
        compute_grpo_loss(lp, jnp.zeros(2), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"old_logprobs_B_T \(2, 3\)"):
        compute_grpo_loss(lp, jnp.zeros(2), mask, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"advantages_B \(4,\)"):
        compute_grpo_loss(lp, jnp.zeros(4), mask)
    with pytest.raises(ValueError, match="ref_logprobs_B_T"):
        compute_grpo_loss(lp, jnp.zeros(2), mask, beta=0.04)
    with pytest.raises(ValueError, match=r"logprobs_B_T is empty"):
        compute_grpo_loss(jnp.zeros((0, 4)), jnp.zeros(0), jnp.ones((0, 4)))
    with pytest.raises(ValueError, match=r"2 axes.*\(4,\)"):
        compute_grpo_loss(jnp.zeros(4), jnp.zeros(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"mask \(3,\)"):
        compute_ppo_loss(*(jnp.zeros(4),) * 6, None, jnp.ones(3))
    with pytest.raises(ValueError, match=r"rejected_logprobs_B \(3,\)"):
        compute_dpo_loss(jnp.zeros(2), jnp.zeros(3), jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        compute_dpo_loss(*(jnp.zeros(2),) * 4, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"mask_B_T \(2, 3\)"):
        sequence_logprobs(lp, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(lp, mask, "constant", max_length=0)


def test_all_masked_batch_is_finite_zero():
    lp = jnp.full((2, 3), -jnp.inf)
    for agg in ("sequence", "token", "constant"):
        loss, diag = jax.jit(compute_grpo_loss, static_argnames="loss_agg")(lp, jnp.ones(2), jnp.zeros((2, 3)),
                                                                            loss_agg=agg)
        assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in diag.values())


def test_token_logprobs_and_entropy_match_numpy_and_feed_the_loss():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    tokens = rng.integers(0, 5, (2, 3))
    lp, ent = token_logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(tokens))
    for b in range(2):
        for t in range(3):
            z = logits[b, t] - logits[b, t].max()
            logp = z - math.log(sum(math.exp(x) for x in z))
            np.testing.assert_allclose(lp[b, t], logp[tokens[b, t]], rtol=1e-5)
            np.testing.assert_allclose(ent[b, t], -sum(math.exp(x) * x for x in logp), rtol=1e-5)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    _, diag = compute_grpo_loss(lp, jnp.ones(2), mask, entropy_B_T=ent)
    np.testing.assert_allclose(diag["entropy"], (ent[0, 0] + ent[0, 1] + ent[1, 0]) / 3, rtol=1e-6)
    with pytest.raises(TypeError, match="integer token ids"):
        token_logprobs_and_entropy(jnp.asarray(logits), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"entropy_B_T \(2, 2\)"):
        compute_grpo_loss(lp, jnp.ones(2), mask, entropy_B_T=jnp.ones((2, 2)))


_vmapped_grpo = jax.jit(jax.vmap(functools.partial(compute_grpo_loss, beta=0.04, eps_high=0.28, loss_agg="token")))
_single_grpo = jax.jit(functools.partial(compute_grpo_loss, beta=0.04, eps_high=0.28, loss_agg="token"))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_jit_vmap_equals_loop_property(seed):
    k = jax.random.split(jax.random.key(seed), 5)
    N, B, T = 3, 2, 4
    lp = jax.random.normal(k[0], (N, B, T)) - 1
    old, ref = lp + 0.3 * jax.random.normal(k[1], (N, B, T)), lp + 0.3 * jax.random.normal(k[2], (N, B, T))
    adv, mask = jax.random.normal(k[3], (N, B)), jax.random.bernoulli(k[4], 0.6, (N, B, T))
    batched, _ = _vmapped_grpo(lp, adv, mask, old, ref)
    for n in range(N):
        np.testing.assert_allclose(batched[n], _single_grpo(lp[n], adv[n], mask[n], old[n], ref[n])[0],
                                   rtol=1e-5, atol=1e-6)

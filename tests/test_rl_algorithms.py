"""AlgorithmConfig presets, dispatch, schedules, and end-to-end learning on a toy token bandit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.rl import (
    AlgorithmConfig,
    AlgorithmSchedule,
    compute_advantages_by_algorithm,
    compute_dpo_loss,
    compute_grpo_loss,
    compute_loss_by_algorithm,
    compute_ppo_loss,
    create_algorithm_config,
    create_ema_updater,
    sequence_logprobs,
)


def test_dispatch_equals_direct_calls():
    k = jax.random.split(jax.random.key(0), 4)
    lp = jax.random.normal(k[0], (4, 6)) - 2
    old, ref = lp + 0.1 * jax.random.normal(k[1], (4, 6)), lp + 0.1 * jax.random.normal(k[2], (4, 6))
    mask, adv = jax.random.bernoulli(k[3], 0.7, (4, 6)), jnp.array([1.0, -1.0, 0.5, 0.0])
    g = {"logprobs_B_T": lp, "advantages_B": adv, "mask_B_T": mask, "old_logprobs_B_T": old, "ref_logprobs_B_T": ref}
    for name, kw in [("grpo", dict(beta=0.04, loss_agg="sequence")),
                     ("dapo", dict(eps_high=0.28, loss_agg="token")),
                     ("dr_grpo", dict(loss_agg="constant"))]:
        got, _ = compute_loss_by_algorithm(create_algorithm_config(name), g)
        np.testing.assert_allclose(got, compute_grpo_loss(lp, adv, mask, old, ref, **kw)[0], rtol=1e-6)
    flat = lp.reshape(-1)
    p = {"logprobs": flat, "old_logprobs": old.reshape(-1), "advantages": flat * 0.3, "values": flat,
         "old_values": flat * 0.9, "targets": flat * 1.1}
    cfg = create_algorithm_config("ppo", vf_coef=0.25, clip_value_eps=None)
    np.testing.assert_allclose(compute_loss_by_algorithm(cfg, p)[0],
                               compute_ppo_loss(*p.values(), vf_coef=0.25, clip_value_eps=None)[0], rtol=1e-6)
    d = {"chosen_logprobs_B": adv, "rejected_logprobs_B": -adv, "ref_chosen_logprobs_B": adv * 0,
         "ref_rejected_logprobs_B": adv * 0}
    np.testing.assert_allclose(compute_loss_by_algorithm(create_algorithm_config("dpo", beta=0.3), d)[0],
                               compute_dpo_loss(*d.values(), beta=0.3)[0], rtol=1e-6)


def test_config_presets_roundtrip_and_errors():
    assert create_algorithm_config("dr_grpo").scale_rewards == "none"
    assert create_algorithm_config("grpo").kl_coef == 0.04
    cfg = create_algorithm_config("dapo", {"beta": 0.1})  # seed 002's example
    assert AlgorithmConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ValueError, match="'a2c'"):
        create_algorithm_config("a2c")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['klcoef'\]"):
        create_algorithm_config("grpo", {"klcoef": 0.1})
    with pytest.raises(ValueError, match="eps_low"):
        AlgorithmConfig(eps_low=1.5)
    with pytest.raises(KeyError, match=r"missing \['mask_B_T'\]"):
        compute_loss_by_algorithm(create_algorithm_config("dapo"), {"logprobs_B_T": jnp.zeros((1, 1)),
                                                                     "advantages_B": jnp.zeros(1)})


def test_schedule_switches_and_compiles_once_per_config():
    sched = AlgorithmSchedule(milestones=((0, create_algorithm_config("grpo", kl_coef=0.2)),
                                          (3, create_algorithm_config("grpo", kl_coef=0.05)),
                                          (6, create_algorithm_config("dapo"))))
    traces = []

    @jax.jit
    def loss_fn(cfg, batch):
        traces.append(cfg.name)
        return compute_loss_by_algorithm(cfg, batch)[0]

    lp = jnp.full((2, 3), -1.0)
    batch = {"logprobs_B_T": lp, "advantages_B": jnp.ones(2), "mask_B_T": jnp.ones((2, 3)),
             "old_logprobs_B_T": lp, "ref_logprobs_B_T": lp - 0.5}
    for it in range(9):
        loss_fn(sched(it), batch)
    assert traces == ["grpo", "grpo", "dapo"]  # one trace per distinct config
    with pytest.raises(ValueError, match="iteration"):
        sched(-1)


# ---- end to end: a token bandit learns --------------------------------------------------------
V, T, P, G = 6, 4, 4, 8


def _sample(theta, key):
    "P*G completions of T tokens from softmax(theta); reward = fraction of token 0; random lengths."
    k1, k2 = jax.random.split(key)
    tokens = jax.random.categorical(k1, theta, shape=(P * G, T))
    lengths = jax.random.randint(k2, (P * G,), 1, T + 1)
    mask = jnp.arange(T)[None, :] < lengths[:, None]
    reward = ((tokens == 0) * mask).sum(1) / lengths
    return tokens, mask, reward.reshape(P, G)


@functools.partial(jax.jit, static_argnums=0)
def _train_step(cfg, theta, ref_theta, key):
    tokens, mask, rewards_P_G = _sample(theta, key)
    adv = compute_advantages_by_algorithm(cfg, rewards_P_G).reshape(-1)
    ref_lp = jax.nn.log_softmax(ref_theta)[tokens]

    def loss(th):
        lp = jax.nn.log_softmax(th)[tokens]
        return compute_loss_by_algorithm(cfg, {"logprobs_B_T": lp, "advantages_B": adv, "mask_B_T": mask,
                                               "ref_logprobs_B_T": ref_lp})

    (value, diag), grad = jax.value_and_grad(loss, has_aux=True)(theta)
    return theta - 2.0 * grad, diag


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo"])
def test_grpo_family_learns_a_token_bandit(name):
    cfg = create_algorithm_config(name)
    theta = jnp.zeros(V)
    ref = theta
    ema = create_ema_updater(0.9)
    for i, key in enumerate(jax.random.split(jax.random.key(1), 40)):
        theta, diag = _train_step(cfg, theta, ref, key)
        ref = ema(ref, theta, i)
        assert all(np.isfinite(float(v)) for v in diag.values())
    p0 = float(jax.nn.softmax(theta)[0])
    assert p0 > 0.6, p0  # from 1/6 at the start


def test_dpo_learns_preferences():
    theta = jnp.zeros(V)
    chosen = jnp.array([[0, 0, 1], [0, 2, 0]])
    rejected = jnp.array([[3, 4, 5], [5, 5, 4]])
    mask = jnp.ones((2, 3), bool)
    ref = sequence_logprobs(jax.nn.log_softmax(theta)[chosen], mask), sequence_logprobs(
        jax.nn.log_softmax(theta)[rejected], mask)

    @jax.jit
    def step(th):
        def loss(t):
            lp = jax.nn.log_softmax(t)
            return compute_dpo_loss(sequence_logprobs(lp[chosen], mask), sequence_logprobs(lp[rejected], mask), *ref,
                                    beta=0.5)
        (value, d), g = jax.value_and_grad(loss, has_aux=True)(th)
        return th - 1.0 * g, value, d

    first = None
    for _ in range(30):
        theta, value, d = step(theta)
        first = float(value) if first is None else first
    assert float(value) < 0.5 * first and float(d["reward_accuracy"]) == 1.0
    assert float(jax.nn.softmax(theta)[0]) > float(jax.nn.softmax(theta)[5])

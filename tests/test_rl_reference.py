"""Reference-model updaters over PyTrees and equinox models."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.rl import create_ema_updater, create_periodic_updater, create_reference_model


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


def test_ema_on_equinox_model_matches_closed_form():
    ref0 = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    policy = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(1))
    ema = eqx.filter_jit(create_ema_updater(0.9))  # equinox models hold functions: filter_jit
    ref = create_reference_model(ref0)
    for step in range(5):
        ref = ema(ref, policy, jnp.asarray(step))  # an array step: no recompilation per value
    # after n updates towards a fixed policy: ref = 0.9^n ref0 + (1 - 0.9^n) policy
    for r, r0, p in zip(_leaves(ref), _leaves(ref0), _leaves(policy)):
        np.testing.assert_allclose(r, 0.9**5 * r0 + (1 - 0.9**5) * p, rtol=1e-5, atol=1e-6)
    x = jnp.ones(3)
    assert ref(x).shape == (2,)  # still a callable model with the same static fields


def test_periodic_updater_inside_scan():
    reset = create_periodic_updater(update_every=4)
    ref0 = {"w": jnp.zeros(2), "n": jnp.array(0)}

    def body(ref, step):
        policy = {"w": jnp.full(2, step.astype(jnp.float32)), "n": step}
        ref = reset(ref, policy, step)
        return ref, ref["w"][0]

    _, trace = jax.lax.scan(body, ref0, jnp.arange(10))
    # syncs at steps 4 and 8 (step 0 never syncs), holding the policy's value of that step
    np.testing.assert_array_equal(trace, [0, 0, 0, 0, 4, 4, 4, 4, 8, 8])
    mix = create_periodic_updater(2, mixup_alpha=0.25)
    out = mix({"w": jnp.zeros(1)}, {"w": jnp.ones(1)}, 2)
    np.testing.assert_allclose(out["w"], [0.25])


def test_reference_has_no_gradient_and_integers_untouched():
    policy = {"w": jnp.array([1.0, -2.0]), "steps": jnp.array(5, jnp.int32)}
    g = jax.grad(lambda p: jnp.sum(create_reference_model(p)["w"] ** 2))(policy | {"steps": None})
    np.testing.assert_array_equal(g["w"], 0.0)
    out = create_ema_updater(0.5)(policy, {"w": jnp.zeros(2), "steps": jnp.array(9, jnp.int32)})
    assert int(out["steps"]) == 5 and out["w"].dtype == jnp.float32
    # bf16 reference stays bf16
    out16 = create_ema_updater(0.5)({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.zeros(2, jnp.bfloat16)})
    assert out16["w"].dtype == jnp.bfloat16


def test_bad_inputs():
    ema = create_ema_updater(0.9)
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(2,\) in ref but \(3,\)"):
        ema({"w": jnp.zeros(2)}, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="same PyTree structure"):
        ema({"w": jnp.zeros(2)}, {"v": jnp.zeros(2)})
    with pytest.raises(ValueError, match="update_every"):
        create_periodic_updater(0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        create_periodic_updater(3, mixup_alpha=2.0)

"""researchlab.llm.lora: adapters on chosen linear weights of a small random Llama. Zero-initialised B gives the
base model's logits bit for bit; the merged weight is W + (alpha/r)·A B exactly; gradients reach only A and B and
an optax run leaves every frozen leaf unchanged; the adapted model samples with the KV-cache generator as its
merged model does; bad specs name the culprit."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from researchlab.llm.generate import KVCacheGenerator, completion_logprobs, kv_generate, left_pad
from researchlab.llm.lora import (
    LoraConfig,
    LoraWeight,
    linear_weight_paths,
    lora_filter,
    lora_init,
    lora_merge,
    lora_partition,
)
from researchlab.llm.models import Llama, init_llama, sequence_logits
from researchlab.llm.types import GenerationConfig, ModelConfig

CFG = ModelConfig(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=40,
                  tie_embeddings=False)
ALL = LoraConfig(rank=4, alpha=8.0, targets=(r"layers\.w", "lm_head"))  # every linear weight, alpha / r = 2


def _base(seed: int = 0) -> Llama:
    return init_llama(CFG, key=jax.random.key(seed))


def _tokens(seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (3, 11), 0, CFG.vocab_size)


def _at(model: Llama, path: str) -> object:
    return functools.reduce(getattr, path.split("."), model)


def _adapters(model: Llama) -> list[LoraWeight]:
    return [x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, LoraWeight)) if isinstance(x, LoraWeight)]


def test_targets_select_the_weights_and_zero_b_gives_the_base_logits_exactly() -> None:
    base = _base()
    lm = lora_init(base, LoraConfig(rank=2), key=jax.random.key(1))  # default targets: wq, wv
    assert isinstance(lm.layers.wq_L_D_HE, LoraWeight) and isinstance(lm.layers.wv_L_D_KE, LoraWeight)
    assert not isinstance(lm.layers.wk_L_D_KE, LoraWeight) and not isinstance(lm.lm_head_D_V, LoraWeight)
    full = lora_init(base, ALL, key=jax.random.key(1))
    assert len(_adapters(full)) == len(linear_weight_paths(base)) == 8
    for lw in _adapters(full):
        assert lw.a_I_R.shape == (*lw.shape[:-1], 4) and lw.b_R_O.shape == (*lw.shape[:-2], 4, lw.shape[-1])
        assert not np.any(np.asarray(lw.b_R_O))
    toks = _tokens()
    logits = jax.jit(sequence_logits)
    np.testing.assert_array_equal(np.asarray(logits(full, toks)), np.asarray(logits(base, toks)))


def test_merge_equals_base_plus_scaled_ba_exactly() -> None:
    lm = lora_init(_base(), ALL, key=jax.random.key(1))
    ints = iter(jax.random.split(jax.random.key(5), 32))
    draw = lambda shape: jax.random.randint(next(ints), shape, -3, 4).astype(jnp.float32)  # exact in float32
    lm = jax.tree.map(lambda x: LoraWeight(x.w_I_O, draw(x.a_I_R.shape), draw(x.b_R_O.shape), x.scale)
                      if isinstance(x, LoraWeight) else x, lm, is_leaf=lambda x: isinstance(x, LoraWeight))
    merged = lora_merge(lm)
    assert not _adapters(merged) and merged.config == lm.config
    for path in linear_weight_paths(lm):
        lw = _at(lm, path)
        want = np.asarray(lw.w_I_O) + 2.0 * np.einsum("...ir,...ro->...io", np.asarray(lw.a_I_R), np.asarray(lw.b_R_O))
        np.testing.assert_array_equal(np.asarray(_at(merged, path)), want, err_msg=path)
    np.testing.assert_array_equal(np.asarray(merged.embed_V_D), np.asarray(lm.embed_V_D))


def test_gradients_reach_only_the_adapters_and_training_leaves_the_base_unchanged() -> None:
    lm = lora_init(_base(), ALL, key=jax.random.key(1))
    adapters, frozen = lora_partition(lm)
    toks = _tokens()

    def nll(adapters: Llama) -> jax.Array:
        logp = jax.nn.log_softmax(sequence_logits(eqx.combine(adapters, frozen), toks[:, :-1]), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

    # the gradient tree has slots for A and B only; all base weights are None there
    grads = jax.jit(jax.grad(nll))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert grads.embed_V_D is None and grads.norm_D is None and grads.layers.attn_norm_L_D is None
    assert all(g.w_I_O is None for g in _adapters(grads))
    # with B = 0 the loss does not depend on A yet; it does on B
    assert all(float(jnp.abs(g.a_I_R).max()) == 0.0 for g in _adapters(grads))
    assert all(float(jnp.abs(g.b_R_O).max()) > 0.0 for g in _adapters(grads))

    opt = optax.adam(1e-2)
    state = opt.init(adapters)
    step = jax.jit(lambda a, s: (lambda l_g: (l_g[0], *opt.update(l_g[1], s, a)))(jax.value_and_grad(nll)(a)))
    first = None
    for _ in range(20):
        loss, updates, state = step(adapters, state)
        adapters = optax.apply_updates(adapters, updates)
        first = float(loss) if first is None else first
    assert float(jax.jit(nll)(adapters)) < first - 0.3
    trained = eqx.combine(adapters, frozen)
    before = jax.tree.leaves(eqx.filter(lm, lora_filter(lm), inverse=True))
    after = jax.tree.leaves(eqx.filter(trained, lora_filter(trained), inverse=True))
    assert len(before) == len(after) == 4 + 8  # embedding, final norm, the 2 norm stacks, the 8 base weights
    for b, a in zip(before, after):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert any(float(jnp.abs(x.a_I_R).max()) > 0 and float(jnp.abs(x.b_R_O).max()) > 0 for x in _adapters(trained))


def test_the_adapted_model_samples_as_its_merged_model() -> None:
    lm = lora_init(_base(), ALL, key=jax.random.key(1))
    lm = jax.tree.map(lambda x: LoraWeight(x.w_I_O, x.a_I_R, 0.05 * jax.random.normal(jax.random.key(9), x.b_R_O.shape),
                                           x.scale) if isinstance(x, LoraWeight) else x,
                      lm, is_leaf=lambda x: isinstance(x, LoraWeight))
    merged = lora_merge(lm)
    ids, mask = left_pad([[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]], pad_id=0)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0)
    a = KVCacheGenerator().generate(lm, ids, mask, cfg, jax.random.key(3))  # the default backend, as batch_generate uses it
    b = kv_generate(merged, ids, mask, cfg, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a.completion_ids_B_T), np.asarray(b.completion_ids_B_T))
    np.testing.assert_allclose(np.asarray(a.logprobs_B_T), np.asarray(b.logprobs_B_T), atol=1e-4, rtol=0)
    teacher = completion_logprobs(lm, ids, mask, a.completion_ids_B_T, a.mask_B_T, cfg.temperature)
    np.testing.assert_allclose(np.asarray(teacher), np.asarray(a.logprobs_B_T), atol=1e-4, rtol=0)


def test_bad_specs_name_the_culprit() -> None:
    base = _base()
    with pytest.raises(ValueError, match=r"target 'embed' selects none of the linear weights \('layers\.wq_L_D_HE'"):
        lora_init(base, LoraConfig(targets=("wq", "embed")), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank 20 exceeds the smaller side of layers\.wk_L_D_KE \(32, 16\)"):
        lora_init(base, LoraConfig(rank=20, targets=("wk",)), key=jax.random.key(0))
    once = lora_init(base, LoraConfig(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="layers.wq_L_D_HE already has an adapter; lora_merge"):
        lora_init(once, LoraConfig(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="the model has no LoraWeight"):
        lora_partition(base)
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    tied = init_llama(CFG.model_copy(update={"tie_embeddings": True}), key=jax.random.key(0))
    assert "lm_head_D_V" not in linear_weight_paths(tied)
    with pytest.raises(ValueError, match="target 'lm_head' selects none"):
        lora_init(tied, LoraConfig(targets=("lm_head",)), key=jax.random.key(0))

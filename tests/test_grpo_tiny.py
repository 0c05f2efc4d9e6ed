"""GRPO on the tiny transformer (researchlab.examples.grpo_tiny): the task's verifier, the model's causality and the
config errors. That the reward rises under the Loop is checked by tests/test_tutorials.py (30 updates)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

from researchlab.examples.grpo_tiny import (
    EOS,
    VOCAB,
    GRPOConfig,
    TinyLM,
    completion_logprobs,
    completion_mask,
    digit_sums,
    encode_prompts,
    init_grpo,
    sample_completions,
    sum_reward,
)


def _reference_sum(tokens: list[int]) -> int:
    total = 0
    for t in tokens:
        if t == EOS:
            break
        total += t if t < 10 else 0
    return total


def test_verifier_matches_a_python_reference():
    rng = np.random.default_rng(0)
    comp = rng.integers(0, VOCAB, size=(200, 5))
    comp[rng.random(200) < 0.3, 2] = EOS
    sums = np.asarray(digit_sums(jnp.asarray(comp)))
    assert sums.tolist() == [_reference_sum(row) for row in comp.tolist()]
    targets = rng.integers(0, 30, size=200)
    r = np.asarray(sum_reward(jnp.asarray(comp), jnp.asarray(targets), tolerance=5.0))
    np.testing.assert_allclose(r, np.maximum(0, 1 - np.abs(sums - targets) / 5.0), rtol=1e-6)
    assert ((r == 1.0) == (sums == targets)).all()
    mask = np.asarray(completion_mask(jnp.asarray(comp)))
    for row, m in zip(comp.tolist(), mask.tolist()):
        end = row.index(EOS) + 1 if EOS in row else len(row)
        assert m == [1.0] * end + [0.0] * (len(row) - end)


def test_model_is_causal_and_logprobs_match_sampling():
    cfg = GRPOConfig(d_model=32, num_layers=1, num_heads=2, max_new_tokens=3)
    state = init_grpo(cfg)
    prompts = encode_prompts(jnp.array([5, 9, 14]))
    comp = sample_completions(state.model, prompts, jax.random.key(0), 3)
    lp = completion_logprobs(state.model, prompts, comp)
    # the log-prob of the first token does not depend on the later ones
    other = comp.at[:, 1:].set(EOS)
    np.testing.assert_allclose(np.asarray(lp[:, 0]), np.asarray(completion_logprobs(state.model, prompts, other)[:, 0]),
                               rtol=1e-5)
    assert np.all(np.asarray(lp) < 0) and np.isfinite(np.asarray(lp)).all()
    # completions hold only digits and <eos>
    many = sample_completions(state.model, encode_prompts(jnp.arange(200) % 19), jax.random.key(1), 3)
    assert set(np.unique(np.asarray(many)).tolist()) <= set(range(10)) | {EOS}


@pytest.mark.parametrize("kwargs, culprit", [
    ({"d_model": 30, "num_heads": 4}, "d_model = 30"),
    ({"group_size": 1}, "group_size"),
    ({"max_target": 100}, "max_target"),
    ({"beta": -1.0}, "beta"),
])
def test_grpo_config_errors_name_the_field(kwargs: dict, culprit: str):
    with pytest.raises((ValidationError, ValueError), match=culprit):
        GRPOConfig(**kwargs)


def test_too_long_sequence_is_a_clear_error():
    lm = TinyLM(VOCAB, 6, d=16, layers=1, heads=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="length 9 is longer than max_len=6"):
        lm(jnp.zeros(9, jnp.int32))

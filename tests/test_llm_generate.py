"""researchlab.llm.generate on small random Llama models (no download): the KV-cache sampler against the
no-cache recompute oracle over batch sizes, ragged left-padded prompts, grouped-query shapes and sampling
settings; stop tokens and max length end each row with the right finish_reason; bad inputs fail naming
the culprit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.llm.generate import (
    Completion,
    KVCacheGenerator,
    OpenAICompatibleGenerator,
    RecomputeGenerator,
    batch_generate,
    completion_logprobs,
    decode_completions,
    generate,
    generate_with_logprobs,
    kv_generate,
    left_pad,
    recompute_generate,
    to_completions,
)
from researchlab.llm.models import init_llama
from researchlab.llm.tokenizers import train_bpe
from researchlab.llm.types import Conversation, GenerationConfig, Message, ModelConfig, finish_reasons

ATOL = 1e-4


def _model(n_kv_heads: int = 2, vocab: int = 64, seed: int = 0, max_seq_len: int = 48):
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, hidden_dim=64,
                      max_seq_len=max_seq_len)
    return init_llama(cfg, key=jax.random.key(seed))


def _prompts(lengths: list[int], vocab: int, seed: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    ids, mask = left_pad([rng.integers(3, vocab, n).tolist() for n in lengths], pad_id=0)
    return jnp.asarray(ids), jnp.asarray(mask)


CASES = [  # (prompt lengths, n_kv_heads, GenerationConfig)
    ([5], 4, GenerationConfig(max_new_tokens=6, temperature=0.0)),
    ([7, 2, 4], 2, GenerationConfig(max_new_tokens=9, temperature=0.0)),
    ([3, 3], 1, GenerationConfig(max_new_tokens=8, temperature=1.0)),
    ([6, 1, 3, 8], 2, GenerationConfig(max_new_tokens=7, temperature=0.7, top_k=10)),
    ([4, 9], 2, GenerationConfig(max_new_tokens=10, temperature=1.3, top_p=0.8)),
    ([2, 5, 5], 4, GenerationConfig(max_new_tokens=5, temperature=0.9, top_k=5, top_p=0.9)),
]


@pytest.mark.parametrize("lengths,n_kv,cfg", CASES)
def test_kv_sampler_equals_recompute_oracle(lengths: list[int], n_kv: int, cfg: GenerationConfig) -> None:
    model = _model(n_kv)
    ids, mask = _prompts(lengths, 64, seed=len(lengths))
    key = jax.random.key(7)
    fast = kv_generate(model, ids, mask, cfg, key)
    slow = recompute_generate(model, ids, mask, cfg, key)
    np.testing.assert_array_equal(np.asarray(fast.completion_ids_B_T), np.asarray(slow.completion_ids_B_T))
    np.testing.assert_allclose(np.asarray(fast.logprobs_B_T), np.asarray(slow.logprobs_B_T), atol=ATOL, rtol=0)
    teacher = completion_logprobs(model, ids, mask, fast.completion_ids_B_T, fast.mask_B_T, cfg.temperature)
    np.testing.assert_allclose(np.asarray(teacher), np.asarray(fast.logprobs_B_T), atol=ATOL, rtol=0)
    assert fast.completion_ids_B_T.shape == (len(lengths), cfg.max_new_tokens)
    np.testing.assert_array_equal(np.asarray(fast.prompt_mask_B_P), np.asarray(mask))
    assert np.all(np.asarray(fast.logprobs_B_T) <= 0)


def test_greedy_equals_argmax_of_recomputed_logits() -> None:
    from researchlab.llm.models import sequence_logits

    model = _model(2)
    ids, mask = _prompts([4, 6], 64, seed=3)
    gen = kv_generate(model, ids, mask, GenerationConfig(max_new_tokens=6, temperature=0.0), jax.random.key(0))
    p = ids.shape[1]
    seq = jnp.concatenate([ids, jnp.zeros((2, 6), ids.dtype)], 1)  # one buffer, so one compilation
    seq_mask = jnp.concatenate([mask, jnp.zeros((2, 6))], 1)
    logits = jax.jit(sequence_logits)
    for t in range(6):  # a plain Python loop: argmax of the logits after the tokens so far
        nxt = jnp.argmax(logits(model, seq, seq_mask)[:, p + t - 1], axis=-1).astype(jnp.int32)
        np.testing.assert_array_equal(np.asarray(nxt), np.asarray(gen.completion_ids_B_T[:, t]))
        seq, seq_mask = seq.at[:, p + t].set(nxt), seq_mask.at[:, p + t].set(1.0)


def test_stop_tokens_end_each_row_with_the_right_finish_reason() -> None:
    model = _model(2)
    ids, mask = _prompts([5, 3, 7], 64, seed=1)
    n = 10
    greedy = GenerationConfig(max_new_tokens=n, temperature=0.0)
    free = np.asarray(kv_generate(model, ids, mask, greedy, jax.random.key(0)).completion_ids_B_T)
    stop = int(free[0, 3])  # row 0 samples it at step 3 at the latest
    gen = kv_generate(model, ids, mask, greedy.model_copy(update={"stop_token_ids": (stop, 63)}), jax.random.key(0),
                      pad_id=1)
    toks, m = np.asarray(gen.completion_ids_B_T), np.asarray(gen.mask_B_T)
    for row in range(3):
        hits = np.flatnonzero(np.isin(free[row], [stop, 63]))
        if hits.size:
            f = hits[0]
            assert finish_reasons(gen)[row] == "stop"
            np.testing.assert_array_equal(m[row], (np.arange(n) <= f).astype(np.float32))
            np.testing.assert_array_equal(toks[row, :f + 1], free[row, :f + 1])
            assert np.all(toks[row, f + 1:] == 1) and np.all(np.asarray(gen.logprobs_B_T)[row, f + 1:] == 0)
        else:
            assert finish_reasons(gen)[row] == "length"
            np.testing.assert_array_equal(m[row], np.ones(n))
    assert finish_reasons(gen)[0] == "stop"
    slow = recompute_generate(model, ids, mask, greedy.model_copy(update={"stop_token_ids": (stop, 63)}),
                              jax.random.key(0), pad_id=1)
    np.testing.assert_array_equal(np.asarray(slow.finish_reason_B), np.asarray(gen.finish_reason_B))
    np.testing.assert_array_equal(np.asarray(slow.mask_B_T), m)


def test_all_rows_stopping_early_ends_the_loop() -> None:
    model = _model(2)
    ids, mask = _prompts([4, 4], 64, seed=2)
    greedy = GenerationConfig(max_new_tokens=12, temperature=0.0)
    first = np.asarray(kv_generate(model, ids, mask, greedy, jax.random.key(0)).completion_ids_B_T[:, 0])
    gen = kv_generate(model, ids, mask, greedy.model_copy(update={"stop_token_ids": tuple(int(x) for x in first)}),
                      jax.random.key(0))
    assert finish_reasons(gen) == ["stop", "stop"]
    np.testing.assert_array_equal(np.asarray(gen.mask_B_T.sum(axis=1)), [1.0, 1.0])


def test_bad_inputs_name_the_culprit() -> None:
    model = _model(2, max_seq_len=16)
    ids, mask = _prompts([10], 64, seed=0)
    with pytest.raises(ValueError, match="prompt length 10 \\+ max_new_tokens 8 = 18 exceeds the model's context max_seq_len=16"):
        kv_generate(model, ids, mask, GenerationConfig(max_new_tokens=8), jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        recompute_generate(model, ids, mask, GenerationConfig(max_new_tokens=8), jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        GenerationConfig(top_k=-2)
    with pytest.raises(ValueError, match="received lengths \\[2, 0\\]"):
        left_pad([[1, 2], []], 0)


def test_batch_generate_on_a_trained_tokenizer_and_the_backends_agree() -> None:
    tok = train_bpe([f"<|im_start|>user\nadd {a} and {b}<|im_end|>\n<|im_start|>assistant\n{a + b}<|im_end|>\n"
                     for a in range(30) for b in range(30)], 300)
    model = _model(2, vocab=tok.vocab_size, max_seq_len=64)
    convs = [Conversation((Message("user", "add 3 and 4"),)), Conversation((Message("user", "add 12 and 9"),))]
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    a = batch_generate(model, tok, convs, cfg, jax.random.key(0))
    b = batch_generate(model, tok, convs, cfg, jax.random.key(0), generator=RecomputeGenerator(tok.pad_id))
    np.testing.assert_array_equal(np.asarray(a.completion_ids_B_T), np.asarray(b.completion_ids_B_T))
    texts = decode_completions(tok, a)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    lp = KVCacheGenerator(tok.pad_id).logprobs(model, a.prompt_ids_B_P, a.prompt_mask_B_P, a.completion_ids_B_T, a.mask_B_T)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(a.logprobs_B_T), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"messages\[0\]\.role is 'human'"):
        batch_generate(model, tok, [Conversation((Message("human", "hi"),))], cfg, jax.random.key(0))


def test_allowed_tokens_restrict_the_policy_in_sampling_and_teacher_forcing() -> None:
    model = _model(2)
    ids, mask = _prompts([5, 2, 7], 64, seed=4)
    allowed = (3, 5, 8, 13, 21, 34)
    for cfg in (GenerationConfig(max_new_tokens=8, temperature=1.0, allowed_token_ids=allowed, stop_token_ids=(21,)),
                GenerationConfig(max_new_tokens=8, temperature=0.0, allowed_token_ids=allowed)):
        fast = kv_generate(model, ids, mask, cfg, jax.random.key(3), pad_id=0)  # pad 0 is not allowed: masked
        slow = recompute_generate(model, ids, mask, cfg, jax.random.key(3), pad_id=0)
        toks, m = np.asarray(fast.completion_ids_B_T), np.asarray(fast.mask_B_T)
        assert set(toks[m > 0].tolist()) <= set(allowed)
        np.testing.assert_array_equal(toks, np.asarray(slow.completion_ids_B_T))
        np.testing.assert_allclose(np.asarray(fast.logprobs_B_T), np.asarray(slow.logprobs_B_T), atol=ATOL, rtol=0)
        teacher = completion_logprobs(model, ids, mask, fast.completion_ids_B_T, fast.mask_B_T, cfg.temperature,
                                      allowed_token_ids=allowed)
        assert np.isfinite(np.asarray(teacher)).all()  # a masked, disallowed pad token contributes 0, not nan
        np.testing.assert_allclose(np.asarray(teacher), np.asarray(fast.logprobs_B_T), atol=ATOL, rtol=0)
    # the restriction renormalises: the allowed tokens' probabilities sum to 1 at every step
    unrestricted = completion_logprobs(model, ids, mask, fast.completion_ids_B_T, fast.mask_B_T, 1.0)
    assert np.all(np.asarray(unrestricted)[m > 0] < np.asarray(teacher)[m > 0])
    with pytest.raises(ValueError, match="allowed_token_ids holds 64, but the vocabulary has 64 tokens"):
        kv_generate(model, ids, mask, GenerationConfig(max_new_tokens=2, allowed_token_ids=(1, 64)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"allowed_token_ids holds negative token ids \[-3\]"):
        GenerationConfig(allowed_token_ids=(-3,))


def test_generate_with_logprobs_and_generator_swaps_the_backend_everywhere() -> None:
    tok = train_bpe([f"<|im_start|>user\nadd {a} and {b}<|im_end|>\n<|im_start|>assistant\n{a + b}<|im_end|>\n"
                     for a in range(20) for b in range(20)], 300)
    model = _model(2, vocab=tok.vocab_size, max_seq_len=64)
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.8, top_k=20)
    conv = Conversation((Message("user", "add 3 and 4"),))
    key = jax.random.key(1)
    done = generate_with_logprobs(model, tok, conv, cfg, key)
    gen = batch_generate(model, tok, [conv], cfg, key)
    assert isinstance(done, Completion) and done.text == decode_completions(tok, gen)[0]
    rows = to_completions(tok, gen)
    assert len(rows) == 1 and rows[0].token_ids_T.tolist() == done.token_ids_T.tolist()
    n = int(np.asarray(gen.mask_B_T).sum())
    assert done.token_ids_T.tolist() == np.asarray(gen.completion_ids_B_T)[0, :n].tolist()
    np.testing.assert_array_equal(done.logprobs_T, np.asarray(gen.logprobs_B_T)[0, :n])
    assert done.finish_reason == finish_reasons(gen)[0] and done.text == generate(model, tok, conv, cfg, key)
    as_str = generate_with_logprobs(model, tok, "add 3 and 4", cfg, key)  # a str is one user message
    assert as_str.token_ids_T.tolist() == done.token_ids_T.tolist() and as_str.text == done.text
    # the recompute oracle as the backend gives the same completion; a server stub is reached by every function
    oracle = RecomputeGenerator(tok.pad_id)
    other = generate_with_logprobs(model, tok, conv, cfg, key, generator=oracle)
    assert other.token_ids_T.tolist() == done.token_ids_T.tolist()
    np.testing.assert_allclose(other.logprobs_T, done.logprobs_T, atol=ATOL, rtol=0)
    assert generate(model, tok, conv, cfg, key, generator=oracle) == done.text
    server = OpenAICompatibleGenerator("http://127.0.0.1:8000/v1")
    for call in (lambda: generate(model, tok, conv, cfg, key, generator=server),
                 lambda: generate_with_logprobs(model, tok, conv, cfg, key, generator=server),
                 lambda: batch_generate(model, tok, [conv], cfg, key, generator=server)):
        with pytest.raises(NotImplementedError, match="OpenAICompatibleGenerator.generate: the server backend"):
            call()

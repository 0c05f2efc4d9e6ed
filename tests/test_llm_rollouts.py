"""researchlab.llm.rollouts and .envs on a tiny random Llama with a BPE tokenizer trained here (seconds): a
multi-turn rollout's tokens are exactly prompt + sampled + tool-suffix ids (sampled ids kept even when not the
canonical encoding), its masks exact, its behaviour log-probabilities those of teacher forcing; every stop
reason from the condition that causes it; tools that raise or hang become tool messages; groups sampled in one
batch; batch_from_rollouts pads exactly and a group with equal rewards has zero advantage. One `llm` test runs a
multi-turn tool rollout with SmolLM2-135M-Instruct."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.llm.chat import CHATML_TEMPLATE, HERMES_TEMPLATE, render_chat
from researchlab.llm.envs import (
    EnvGroup,
    ScriptedGenerator,
    ToolEnv,
    create_multiturn_rollout,
    rollout_groups,
)
from researchlab.llm.generate import KVCacheGenerator
from researchlab.llm.models import init_llama
from researchlab.llm.rollouts import (
    Observation,
    Policy,
    Renderer,
    RolloutGroup,
    SingleTurnEnv,
    StepResult,
    as_conversation,
    batch_from_rollouts,
    create_batch_rollouts,
    create_rollout,
    render_observation,
    render_prompt,
    rollout_logprobs,
    run_envs,
    run_sync,
)
from researchlab.llm.tokenizers import train_bpe
from researchlab.llm.tools import tool_schema
from researchlab.llm.types import Conversation, GenerationConfig, Message, ModelConfig, ToolCall
from researchlab.rl.advantages import compute_grpo_advantages

ATOL = 1e-4


def add(
    a: int,  # first term
    b: int,  # second term
) -> int:
    "Add two integers."
    return a + b


def boom(
    x: int,  # anything
) -> int:
    "Always raises."
    raise ValueError(f"cannot take {x}")


_RELEASE = threading.Event()


def hang(
    x: int,  # anything
) -> int:
    "Waits until the test module ends."
    _RELEASE.wait(120)
    return x


TOOLS = [add, boom, hang]
QUESTION = "What is 2 plus 3?"
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
ANSWER = "2 plus 3 is 5.<|im_end|>"
SUFFIX = "\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
CFG = GenerationConfig(max_new_tokens=40, temperature=1.0)


@pytest.fixture(scope="module")
def tok():
    corpus = [f"<|im_start|>user\nWhat is {a} plus {b}?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
              f'{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
              f"<tool_response>\n{a + b}\n</tool_response><|im_end|>\n" for a in range(10) for b in range(10)]
    corpus += [render_chat(Conversation((Message("user", "hi"),), tuple(tool_schema(f) for f in TOOLS)),
                           HERMES_TEMPLATE)] * 20
    yield train_bpe(corpus, 512)
    _RELEASE.set()


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=1024)
    return init_llama(cfg, key=jax.random.key(0))


@pytest.fixture(scope="module")
def renderer(tok):
    return Renderer(tok, HERMES_TEMPLATE)


def scripted(model, tok, *turns, **kw):
    kw.setdefault("tools", TOOLS)
    policy = Policy(model, ScriptedGenerator(tok, [list(turns)], pad_id=tok.pad_id), version=7)
    return create_multiturn_rollout(policy, Renderer(tok, HERMES_TEMPLATE), kw.pop("prompt", QUESTION),
                                    kw.pop("cfg", CFG), jax.random.key(0), **kw)


def prompt_ids(tok, prompt=QUESTION):
    conv = as_conversation(prompt)._replace(tools=tuple(tool_schema(f) for f in TOOLS))
    return render_prompt(Renderer(tok, HERMES_TEMPLATE), conv)


def test_multiturn_tokens_are_prompt_sampled_and_tool_suffix_exactly(model, tok) -> None:
    r = scripted(model, tok, CALL, ANSWER)
    p, t1, sfx, t2 = prompt_ids(tok), tok.encode(CALL), tok.encode(SUFFIX.format(5)), tok.encode(ANSWER)
    assert r.tokens_T.tolist() == p + t1 + sfx + t2
    assert r.loss_mask_T.tolist() == [0.0] * len(p) + [1.0] * len(t1) + [0.0] * len(sfx) + [1.0] * len(t2)
    assert r.prompt_length == len(p)
    assert r.turn_spans == ((len(p), len(p) + len(t1)), (len(p) + len(t1) + len(sfx), len(r.tokens_T)))
    assert (r.stop_reason, r.policy_version, r.turn_rewards_N.tolist()) == ("completed", 7, [0.0, 0.0])
    assert [m.role for m in r.conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert r.conversation.messages[1] == Message("assistant", "", (ToolCall("add", {"a": 2, "b": 3}, "call_0"),))
    assert r.conversation.messages[3].content == "2 plus 3 is 5."
    assert [(t.name, t.content, t.error) for t in r.tool_results] == [("add", "5", None)]
    np.testing.assert_allclose(rollout_logprobs([r], model)[0], r.logprobs_T, atol=ATOL, rtol=0)
    assert np.all(r.logprobs_T[r.loss_mask_T == 0] == 0) and np.all(r.logprobs_T[r.loss_mask_T == 1] < 0)


def test_sampled_ids_are_kept_even_when_not_the_canonical_encoding(model, tok) -> None:
    canonical = tok.encode(CALL)
    byte_ids = [i for ch in '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
                for i in tok.encode(ch)] + [tok.eos_id]  # one token per character: same text, other ids
    assert byte_ids != canonical and tok.decode(byte_ids) == tok.decode(canonical)
    r = scripted(model, tok, byte_ids, ANSWER, cfg=CFG.model_copy(update={"max_new_tokens": len(byte_ids)}))
    p = prompt_ids(tok)
    assert r.tokens_T[len(p):len(p) + len(byte_ids)].tolist() == byte_ids  # never decoded and re-encoded
    assert r.tool_results[0].content == "5"
    np.testing.assert_allclose(rollout_logprobs([r], model)[0], r.logprobs_T, atol=ATOL, rtol=0)


def test_stop_reasons(model, tok) -> None:
    bad = '<tool_call>{"name": "add", "arguments": {"a": 2,}}</tool_call><|im_end|>'
    assert scripted(model, tok, "2 plus 3").stop_reason == "length"
    assert scripted(model, tok, "5<|im_end|>").stop_reason == "completed"
    r = scripted(model, tok, bad)
    assert (r.stop_reason, len(r.turn_spans), r.tool_results) == ("parse_error", 1, ())
    seen = scripted(model, tok, bad, CALL, ANSWER, on_parse_error="observe")
    assert seen.stop_reason == "completed" and [t.error for t in seen.tool_results] == ["parse_error", None]
    assert "is not valid JSON" in seen.conversation.messages[2].content
    done = scripted(model, tok, CALL, CALL, stop_condition=lambda c: c.messages[-1].content == "5")
    assert (done.stop_reason, len(done.turn_spans)) == ("stop_condition", 1)
    assert done.tokens_T.tolist() == prompt_ids(tok) + tok.encode(CALL)  # the policy never read the result
    assert scripted(model, tok, CALL, CALL, CALL, max_turns=2).stop_reason == "max_turns"
    assert len(scripted(model, tok, CALL, CALL, CALL, max_turns=2).turn_spans) == 2
    n1 = len(tok.encode(CALL))
    cut = scripted(model, tok, CALL, CALL, max_tokens=n1 + 4)
    assert (cut.stop_reason, int(cut.loss_mask_T.sum()), len(cut.turn_spans)) == ("max_tokens", n1 + 4, 2)
    exact = scripted(model, tok, CALL, CALL, max_tokens=n1)  # budget spent by a complete turn: no second turn
    assert (exact.stop_reason, int(exact.loss_mask_T.sum())) == ("max_tokens", n1)


def test_context_overflow(tok) -> None:
    p, t1, sfx = prompt_ids(tok), tok.encode(CALL), tok.encode(SUFFIX.format(5))
    n_new = len(t1) + 2
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      max_seq_len=len(p) + len(t1) + len(sfx) + n_new - 1)
    short = init_llama(cfg, key=jax.random.key(1))
    r = scripted(short, tok, CALL, CALL, cfg=CFG.model_copy(update={"max_new_tokens": n_new}))
    assert (r.stop_reason, len(r.turn_spans), len(r.tokens_T)) == ("context_overflow", 1, len(p) + len(t1) + len(sfx))
    tiny_ctx = init_llama(cfg.model_copy(update={"max_seq_len": len(p)}), key=jax.random.key(1))
    first = scripted(tiny_ctx, tok, CALL)  # not even the first turn fits
    assert (first.stop_reason, first.turn_spans, len(first.tokens_T)) == ("context_overflow", (), len(p))
    # the tool's reply alone would overflow: the rollout stops before it, its tokens never longer than the context
    reply_ctx = len(p) + len(t1) + len(sfx) - 1
    assert len(p) + n_new <= reply_ctx  # the first turn fits
    narrow = init_llama(cfg.model_copy(update={"max_seq_len": reply_ctx}), key=jax.random.key(1))
    r = scripted(narrow, tok, CALL, CALL, cfg=CFG.model_copy(update={"max_new_tokens": n_new}))
    assert (r.stop_reason, len(r.turn_spans)) == ("context_overflow", 1)
    assert r.tokens_T.tolist() == p + t1 and len(r.tokens_T) <= reply_ctx
    assert r.conversation.messages[-1].role == "tool"  # the reply is in the conversation, not in the tokens


def test_tools_that_raise_or_hang_become_tool_messages(model, tok) -> None:
    raising = '<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call><|im_end|>'
    hanging = '<tool_call>{"name": "hang", "arguments": {"x": 1}}</tool_call><|im_end|>'
    r = scripted(model, tok, raising, hanging, ANSWER, timeout=0.3)
    assert r.stop_reason == "completed"
    assert [(t.name, t.error) for t in r.tool_results] == [("boom", "exception"), ("hang", "timeout")]
    tool_msgs = [m.content for m in r.conversation.messages if m.role == "tool"]
    assert tool_msgs == ["error: boom raised ValueError: cannot take 1", "error: hang did not return within 0.3 s"]
    p, t1, t2 = prompt_ids(tok), tok.encode(raising), tok.encode(hanging)
    expect = p + t1 + tok.encode(SUFFIX.format(tool_msgs[0])) + t2 + tok.encode(SUFFIX.format(tool_msgs[1]))
    assert r.tokens_T.tolist() == expect + tok.encode(ANSWER)


def test_kv_sampled_group_logprobs_and_masks(model, tok, renderer) -> None:
    builder = EnvGroup(partial(ToolEnv, renderer, as_conversation(QUESTION), TOOLS, on_parse_error="observe",
                               max_turns=3), group_size=3, metadata={"answer": "5"})
    groups = rollout_groups([builder, builder], Policy(model, KVCacheGenerator(tok.pad_id)),
                            GenerationConfig(max_new_tokens=12), jax.random.key(4), max_tokens=30,
                            reward_fn=lambda r: float(len(r.turn_spans)), ref_model=model)
    assert [len(g.rollouts) for g in groups] == [3, 3] and groups[1].metadata["answer"] == "5"
    flat = [r for g in groups for r in g.rollouts]
    for r, lp in zip(flat, rollout_logprobs(flat, model)):
        np.testing.assert_allclose(lp, r.logprobs_T, atol=ATOL, rtol=0)
        np.testing.assert_allclose(r.ref_logprobs_T, r.logprobs_T, atol=ATOL, rtol=0)
        spans = np.zeros(len(r.tokens_T), np.float32)
        for a, b in r.turn_spans:
            spans[a:b] = 1.0
        assert np.array_equal(spans, r.loss_mask_T) and r.loss_mask_T.sum() <= 30
        assert r.rewards_K.tolist() == [float(len(r.turn_spans))]
    assert flat[0].tokens_T.tolist() != flat[1].tokens_T.tolist()  # the rows of a group are different samples


def test_single_turn_batch_and_grpo_advantages(model, tok) -> None:
    renderer = Renderer(tok, CHATML_TEMPLATE)
    policy = Policy(model, KVCacheGenerator(tok.pad_id))
    groups = create_batch_rollouts(policy, renderer, ["What is 1 plus 1?", QUESTION], CFG, jax.random.key(1),
                                   group_size=4, metadata=[{"answer": "2"}, {"answer": "5"}],
                                   reward_fn=lambda r: 1.0)
    batch = batch_from_rollouts(groups)
    np.testing.assert_array_equal(np.asarray(batch.advantages_B), np.zeros(8))  # equal rewards: no signal
    for g, p in zip(groups, ["What is 1 plus 1?", QUESTION]):
        ids = render_prompt(renderer, as_conversation(p))
        for r in g.rollouts:
            assert r.tokens_T[:r.prompt_length].tolist() == ids
            assert r.stop_reason == ("completed" if r.tokens_T[-1] == tok.eos_id else "length")
    scored = [RolloutGroup(tuple(r._replace(rewards_K=np.array([float(j), 1.0], np.float32))
                                 for j, r in enumerate(g.rollouts))) for g in groups]
    b2 = batch_from_rollouts(scored, weights_K=[1.0, 0.0])
    expect = compute_grpo_advantages(jnp.asarray([[0.0, 1, 2, 3]] * 2))
    np.testing.assert_allclose(np.asarray(b2.advantages_B), np.asarray(expect).reshape(-1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(b2.rewards_B), [0, 1, 2, 3] * 2)


def test_batch_from_rollouts_pads_exactly_and_checks(model, tok) -> None:
    r1 = scripted(model, tok, CALL, ANSWER)._replace(rewards_K=np.array([1.0], np.float32))
    r2 = scripted(model, tok, "5<|im_end|>")._replace(rewards_K=np.array([0.0], np.float32))
    r3 = r2._replace(rewards_K=np.array([0.5], np.float32), policy_version=9)
    b = batch_from_rollouts([RolloutGroup((r1, r2)), RolloutGroup((r3,))], pad_multiple=16, pad_id=0)
    width = -(-len(r1.tokens_T) // 16) * 16
    assert b.tokens_B_T.shape == (3, width) and b.ref_logprobs_B_T is None
    for i, r in enumerate((r1, r2, r3)):
        n = len(r.tokens_T)
        assert np.asarray(b.tokens_B_T[i, :n]).tolist() == r.tokens_T.tolist()
        assert np.all(np.asarray(b.tokens_B_T[i, n:]) == 0) and np.asarray(b.attention_mask_B_T[i]).sum() == n
        np.testing.assert_array_equal(np.asarray(b.loss_mask_B_T[i, :n]), r.loss_mask_T)
        np.testing.assert_array_equal(np.asarray(b.logprobs_B_T[i, :n]), r.logprobs_T)
    assert np.asarray(b.group_ids_B).tolist() == [0, 0, 1] and np.asarray(b.policy_version_B).tolist() == [7, 7, 9]
    np.testing.assert_allclose(np.asarray(b.advantages_B), [1 / (np.std([1, 0], ddof=1) + 1e-4) * 0.5,
                                                            -0.5 / (np.std([1, 0], ddof=1) + 1e-4), 0.0], rtol=1e-5)
    with pytest.raises(ValueError, match="score them first"):
        batch_from_rollouts([RolloutGroup((r1, r2._replace(rewards_K=np.zeros(0, np.float32))))])
    with pytest.raises(ValueError, match="1 of 2 rollouts have ref_logprobs_T"):
        batch_from_rollouts([RolloutGroup((r1._replace(ref_logprobs_T=r1.logprobs_T), r2))])
    with pytest.raises(ValueError, match="every group needs rollouts"):
        batch_from_rollouts([RolloutGroup(())])


def test_render_observation_refuses_a_template_that_rewrites_history(tok) -> None:
    def forgetful(conv: Conversation, gen: bool):  # renders only the last message: not prefix-preserving
        m = conv.messages[-1]
        return [(f"<|im_start|>{m.role}\n", False), (m.content + "<|im_end|>", m.role == "assistant"),
                ("\n<|im_start|>assistant\n" if gen else "\n", False)]

    r = Renderer(tok, template_fn=forgetful)
    hist = Conversation((Message("user", "hi"), Message("assistant", "hello")))
    with pytest.raises(ValueError, match="not prefix-preserving|prefix-preserving template"):
        render_observation(r, hist, [Message("tool", "5")])
    ok = Renderer(tok, CHATML_TEMPLATE)
    assert tok.decode(render_observation(ok, hist, [Message("user", "more")])) == \
        "\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"


def test_run_envs_contract_errors_and_run_sync_in_a_running_loop(model, tok) -> None:
    r = Renderer(tok, CHATML_TEMPLATE)
    other = Renderer(tok, CHATML_TEMPLATE, stop_token_ids=(5,))
    envs = [SingleTurnEnv(r, as_conversation("hi")), SingleTurnEnv(other, as_conversation("hi"))]
    with pytest.raises(ValueError, match="different stop tokens"):
        run_sync(run_envs(envs, Policy(model), CFG, jax.random.key(0)))

    class Echo:  # a hand-written env: the protocol is two async methods
        async def initial_observation(self) -> Observation:
            return Observation(tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), (tok.eos_id,))

        async def step(self, action_ids):
            return StepResult(2.5, True, (), "completed", (Message("assistant", tok.decode(action_ids)),))

    async def inside_a_loop():  # as in Jupyter: an event loop is already running
        return create_rollout(Policy(model), r, "hi", CFG, jax.random.key(0)), \
            run_sync(run_envs([Echo()], Policy(model), CFG, jax.random.key(0)))

    single, (echo,) = asyncio.run(inside_a_loop())
    assert single.prompt_length == len(render_prompt(r, as_conversation("hi"))) and echo.turn_rewards_N.tolist() == [2.5]


@pytest.mark.llm
def test_smollm2_multiturn_tool_rollout_is_token_exact() -> None:
    from researchlab.llm.models import load_model
    from researchlab.llm.tokenizers import load_tokenizer, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    stok = load_tokenizer("smollm2")
    renderer = Renderer(stok, HERMES_TEMPLATE)
    prompt = Conversation((Message("system", "Use the add tool for arithmetic."), Message("user", QUESTION)))
    p = render_prompt(renderer, prompt._replace(tools=(tool_schema(add),)))
    # the real tokenizer and template, scripted turns scored by a small random decoder of SmolLM2's vocabulary
    small = init_llama(ModelConfig(vocab_size=stok.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                   hidden_dim=64, max_seq_len=1024), key=jax.random.key(0))
    script = ScriptedGenerator(stok, [[CALL, ANSWER]], pad_id=stok.pad_id)
    r = create_multiturn_rollout(Policy(small, script), renderer, prompt, GenerationConfig(max_new_tokens=64),
                                 jax.random.key(0), tools=[add])
    assert r.tokens_T.tolist() == p + stok.encode(CALL) + stok.encode(SUFFIX.format(5)) + stok.encode(ANSWER)
    assert r.stop_reason == "completed" and r.tool_results[0].content == "5"
    # the real model sampling: whatever it writes, the rollout starts with the prompt and its log-probabilities
    # are the ones teacher forcing computes over the whole token sequence
    smol = load_model("smollm2")
    sampled = create_multiturn_rollout(Policy(smol, KVCacheGenerator(stok.pad_id)), renderer, prompt,
                                       GenerationConfig(max_new_tokens=16, temperature=0.0), jax.random.key(0),
                                       tools=[add], max_turns=2, on_parse_error="observe")
    assert sampled.tokens_T[:len(p)].tolist() == p and sampled.loss_mask_T[:len(p)].sum() == 0
    np.testing.assert_allclose(rollout_logprobs([sampled], smol)[0], sampled.logprobs_T, atol=2e-3, rtol=0)

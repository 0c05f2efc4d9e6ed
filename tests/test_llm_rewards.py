"""researchlab.llm.rewards: reward functions over hand-made rollouts (exact / numeric answer match, format,
tool use, DAPO length punishment), vector rewards and their combination, batch scoring and its errors; the
Scorer protocol with the equinox RewardModel: scores read at each row's last real token regardless of padding,
save/load round trip, a Bradley-Terry step lowers the loss, and scores fill rewards_K."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.llm.models import init_llama
from researchlab.llm.rewards import (
    Scorer,
    bradley_terry_loss,
    combine_rewards,
    compute_batch_rewards,
    compute_reward_model_score,
    compute_scalar_reward,
    compute_vector_reward,
    exact_match_reward,
    final_text,
    format_reward,
    init_reward_model,
    last_number,
    length_reward,
    load_reward_model,
    numeric_match_reward,
    reward_model_from,
    reward_model_scores,
    save_reward_model,
    tool_use_reward,
)
from researchlab.llm.rollouts import Rollout, RolloutGroup, batch_from_rollouts
from researchlab.llm.tools import ToolResult
from researchlab.llm.types import Conversation, Message, ModelConfig


def rollout(reply: str = "", answer: object = "12", tokens: list[int] | None = None, sampled: int = 4,
            tools: tuple[ToolResult, ...] = (), extra: tuple[Message, ...] = ()) -> Rollout:
    ids = np.asarray(tokens if tokens is not None else list(range(3, 13)), np.int32)
    mask = (np.arange(len(ids)) >= len(ids) - sampled).astype(np.float32)
    conv = Conversation((Message("user", "q"), Message("assistant", reply)) + extra)
    return Rollout(ids, mask, np.zeros(len(ids), np.float32), len(ids) - sampled, ((len(ids) - sampled, len(ids)),),
                   np.zeros(1, np.float32), np.zeros(0, np.float32), conv, tools, "completed", 0, {"answer": answer})


def test_answer_match_builders() -> None:
    assert exact_match_reward()(rollout("  12\n")) == 1.0
    assert exact_match_reward()(rollout("Twelve")) == 0.0
    assert exact_match_reward(correct=2.0, wrong=-1.0)(rollout("13")) == -1.0
    assert exact_match_reward()(rollout("PARIS", answer="Paris")) == 1.0  # case and whitespace normalised
    assert numeric_match_reward()(rollout("so the answer is 12.0")) == 1.0
    assert numeric_match_reward()(rollout("3*4 = 1,234")) == 0.0
    assert numeric_match_reward()(rollout("1,234", answer=1234)) == 1.0
    assert numeric_match_reward(abs_tol=0.1)(rollout("12.05")) == 1.0
    assert numeric_match_reward()(rollout("no number")) == 0.0
    assert (last_number("from -3 to 4.5"), last_number("none")) == (4.5, None)
    with pytest.raises(KeyError, match="rollout.metadata has no 'gold'.*it has \\['answer'\\]"):
        numeric_match_reward("gold")(rollout("12"))


def test_final_text_is_the_last_assistant_message() -> None:
    r = rollout("first", extra=(Message("tool", "5"), Message("assistant", "last"), Message("tool", "6")))
    assert final_text(r) == "last"
    assert final_text(r._replace(conversation=Conversation((Message("user", "q"),)))) == ""


def test_format_tool_and_length_builders() -> None:
    assert format_reward(r"<answer>\d+</answer>")(rollout("x <answer>12</answer>")) == 1.0
    assert format_reward(r"<answer>\d+</answer>", full_match=True)(rollout("x <answer>12</answer>")) == 0.0
    ok, bad = ToolResult("add", "c0", "5"), ToolResult("add", "c1", "error: x", "timeout")
    assert tool_use_reward()(rollout(tools=(bad, ok))) == 1.0
    assert tool_use_reward(failure_penalty=0.25)(rollout(tools=(bad, bad))) == -0.5
    assert tool_use_reward("mul")(rollout(tools=(ok,))) == 0.0
    assert [length_reward(10, 4)(rollout(sampled=n)) for n in (6, 8, 10)] == [0.0, -0.5, -1.0]
    assert length_reward(10, 4)(rollout(tokens=list(range(20)), sampled=11)) == -1.0
    with pytest.raises(ValueError, match="need 0 < cache_length <= max_length"):
        length_reward(4, 8)


def test_vector_scalar_and_batch_rewards() -> None:
    vec = combine_rewards(numeric_match_reward(), format_reward("answer"), length_reward(6, 4))
    r = rollout("the answer is 12", sampled=5)
    np.testing.assert_allclose(compute_vector_reward(r, vec), [1.0, 1.0, -0.75])  # (6 - 4 - 5) / 4
    assert compute_scalar_reward(r, vec) == pytest.approx(1.25)
    assert compute_scalar_reward(r, vec, weights_K=[2.0, 0.0, 1.0]) == pytest.approx(1.25)
    assert compute_scalar_reward(r, vec, aggregator=lambda x: x.min(-1)) == pytest.approx(-0.75)
    assert compute_scalar_reward(r, numeric_match_reward()) == 1.0
    groups = compute_batch_rewards([RolloutGroup((rollout("12"), rollout("11"))), RolloutGroup((rollout("12"),))], vec)
    assert [[x.rewards_K.tolist() for x in g.rollouts] for g in groups] == \
        [[[1.0, 0.0, -0.5], [0.0, 0.0, -0.5]], [[1.0, 0.0, -0.5]]]
    batch = batch_from_rollouts(groups, weights_K=[1.0, 1.0, 1.0])
    np.testing.assert_allclose(np.asarray(batch.rewards_B), [0.5, -0.5, 0.5])
    np.testing.assert_allclose(np.asarray(batch.advantages_B)[2], 0.0)  # a group of one has no baseline to beat


def test_reward_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="returned a non-finite reward"):
        compute_vector_reward(rollout(), lambda r: float("inf"))
    with pytest.raises(ValueError, match=r"must return a float or a 1-D \[K\]"):
        compute_vector_reward(rollout(), lambda r: [[1.0]])
    with pytest.raises(ValueError, match="vectors of different lengths"):
        compute_batch_rewards([RolloutGroup((rollout("ab"), rollout("a")))], lambda r: [0.0] * len(final_text(r)))
    with pytest.raises(ValueError, match="pass reward_fn .* or batch_reward_fn"):
        compute_batch_rewards([RolloutGroup((rollout(),))])
    with pytest.raises(ValueError, match=r"must return \[B\] or \[B, K\] with B=2"):
        compute_batch_rewards([RolloutGroup((rollout(), rollout()))], batch_reward_fn=lambda rs: np.zeros(3))
    with pytest.raises(ValueError, match="give at least one reward function"):
        combine_rewards()


CFG = ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=64)


def test_reward_model_scores_the_last_real_token_whatever_the_padding(tmp_path) -> None:
    rm = init_reward_model(CFG, key=jax.random.key(0))
    rm = eqx.tree_at(lambda m: m.bias, rm, jnp.asarray(0.5))
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = [float(reward_model_scores(rm, jnp.asarray([s]), jnp.ones((1, len(s))))[0]) for s in seqs]
    scorer = load_reward_model(rm)
    assert isinstance(scorer, Scorer)
    scores = compute_reward_model_score([rollout(tokens=s, sampled=1) for s in seqs], scorer, pad_multiple=8)
    np.testing.assert_allclose(scores, alone, atol=1e-5)
    assert len(set(np.round(scores, 5))) == 3  # the scores differ: the head reads real tokens
    saved = load_reward_model(save_reward_model(tmp_path / "rm" / "model.eqx", rm))
    np.testing.assert_allclose(compute_reward_model_score([rollout(tokens=s) for s in seqs], saved), scores, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="written by save_reward_model"):
        load_reward_model(tmp_path / "missing.eqx")
    assert load_reward_model("anything", loader=lambda src: lambda t, m: np.full(len(t), 3.0))(np.zeros((2, 4)), None).tolist() \
        == [3.0, 3.0]
    policy_like = init_llama(CFG, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"lm_head_D_V must have shape \[D, 1\]"):
        reward_model_scores(eqx.tree_at(lambda m: m.decoder, rm, policy_like), jnp.asarray([[1, 2]]), jnp.ones((1, 2)))


def test_reward_model_from_policy_keeps_the_trunk_and_learns_preferences() -> None:
    policy = init_llama(CFG, key=jax.random.key(2))
    rm = reward_model_from(policy, key=jax.random.key(3))
    assert rm.decoder.embed_V_D is policy.embed_V_D and rm.decoder.lm_head_D_V.shape == (16, 1)
    rng = np.random.default_rng(0)
    body = rng.integers(8, 40, (16, 5)).astype(np.int32)
    chosen = jnp.asarray(np.concatenate([body, np.full((16, 1), 3, np.int32)], 1))
    rejected = jnp.asarray(np.concatenate([body, np.full((16, 1), 4, np.int32)], 1))
    ones = jnp.ones(chosen.shape)
    loss_grad = eqx.filter_jit(eqx.filter_value_and_grad(bradley_terry_loss))
    before, grads = loss_grad(rm, chosen, ones, rejected, ones)
    assert float(before) == pytest.approx(np.log(2), abs=0.05)  # a fresh small head cannot tell them apart
    for _ in range(10):
        loss, grads = loss_grad(rm, chosen, ones, rejected, ones)
        rm = jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, rm, grads)
    assert float(loss) < float(before)
    scores = compute_batch_rewards(
        [RolloutGroup((rollout(tokens=np.asarray(chosen[0]).tolist()), rollout(tokens=np.asarray(rejected[0]).tolist())))],
        batch_reward_fn=lambda rs: compute_reward_model_score(rs, load_reward_model(rm)))
    good, worse = (r.rewards_K[0] for r in scores[0].rollouts)
    assert good > worse

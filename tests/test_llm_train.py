"""researchlab.llm.train on a one-block random Llama with a BPE tokenizer trained here (seconds each): GRPO on a group
with equal rewards gives zero advantage and zero policy gradient; importance weights scale the policy gradient;
swapping `kl_fn`, `loss_fn`, `ref_model_update_fn` or the generator changes only what it should; an
`AlgorithmSchedule` grpo -> grpo(kl 0.05) -> dapo switches mid-training with one trace per distinct config; a short
`train()` makes the reward of a toy task rise; `train(..., resume=True)` continues bit-exactly; LoRA runs train and
checkpoint only the adapters; the iteration metrics (stop reasons, tool-call success) are those of the rollouts."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.design.persist import CheckpointManager
from researchlab.llm.chat import CHATML_TEMPLATE
from researchlab.llm.envs import ScriptedGenerator
from researchlab.llm.generate import KVCacheGenerator
from researchlab.llm.lora import LoraConfig, lora_init
from researchlab.llm.models import init_llama
from researchlab.llm.rewards import final_text
from researchlab.llm.rollouts import Policy, Renderer, batch_from_rollouts, create_batch_rollouts
from researchlab.llm.tokenizers import train_bpe
from researchlab.llm.tools import ToolResult
from researchlab.llm.train import (
    Problem,
    RolloutProvider,
    TrainConfig,
    TrainFns,
    algorithm_loss,
    get_reference_logprobs,
    init_train_state,
    make_optimizer,
    rollout_stats,
    token_logprobs,
    train,
    training_iteration,
    training_step,
)
from researchlab.llm.types import GenerationConfig, ModelConfig
from researchlab.rl.algorithms import (
    AlgorithmSchedule,
    compute_advantages_by_algorithm,
    compute_loss_by_algorithm,
)
from researchlab.rl.algorithms import create_algorithm_config as algo
from researchlab.rl.kl import compute_per_token_kl
from researchlab.rl.reference import create_ema_updater

PROBLEMS = [Problem(f"Write {d}s", {"digit": str(d)}) for d in (3, 7)]


def digit_reward(rollout) -> float:
    "The fraction of the reply's 4 characters that are the asked digit."
    return sum(ch == rollout.metadata["digit"] for ch in final_text(rollout)) / 4


@pytest.fixture(scope="module")
def tok():
    corpus = [f"<|im_start|>user\nWrite {d}s<|im_end|>\n<|im_start|>assistant\n{d}{d}{d}<|im_end|>\n"
              for d in range(10)] * 5
    return train_bpe(corpus, 300)


@pytest.fixture(scope="module")
def renderer(tok):
    return Renderer(tok, CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def model(tok):
    m = init_llama(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                               max_seq_len=64), key=jax.random.key(0))
    return eqx.tree_at(lambda m: m.embed_V_D, m, m.embed_V_D * 0.05)  # small logits: varied first samples


@pytest.fixture(scope="module")
def gen(tok):
    return GenerationConfig(max_new_tokens=4, allowed_token_ids=tuple(tok.encode(str(d))[0] for d in range(10))
                            + (tok.eos_id,))


@pytest.fixture(scope="module")
def cfg(gen):
    return TrainConfig(num_prompts=2, group_size=8, lr=1e-2, generation=gen, pad_to=32,
                       algorithm=algo("grpo", kl_coef=0.0))


@pytest.fixture(scope="module")
def rb(model, renderer, tok, gen):
    groups = create_batch_rollouts(Policy(model, KVCacheGenerator(tok.pad_id)), renderer, ["Write 3s", "Write 7s"],
                                   gen, jax.random.key(1), group_size=4, reward_fn=digit_reward,
                                   metadata=[{"digit": "3"}, {"digit": "7"}])
    return batch_from_rollouts(groups, pad_multiple=32)


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


def state_arrays(state):
    s = eqx.tree_at(lambda s: s.rng, state, jax.random.key_data(state.rng))
    return eqx.filter(s, eqx.is_array)


def loss_grads(model, rb, config, gen, **kw):
    "Gradient of the loss of training_step's loss batch at `model` (old log-probs = the batch's)."
    params, frozen = eqx.partition(model, eqx.is_inexact_array)
    mask = rb.loss_mask_B_T
    adv = rb.advantages_B[:, None] * kw.pop("weights", jnp.ones_like(mask))

    def f(p):
        lp, ent = token_logprobs(eqx.combine(p, frozen), rb.tokens_B_T, rb.attention_mask_B_T,
                                 allowed_token_ids=gen.allowed_token_ids)
        return compute_loss_by_algorithm(config, {"logprobs_B_T": lp * mask, "advantages_B": adv, "mask_B_T": mask,
                                                  "old_logprobs_B_T": rb.logprobs_B_T, "entropy_B_T": ent})[0]
    return jax.grad(f)(params)


def test_equal_rewards_give_zero_advantage_and_zero_policy_gradient(model, rb, gen) -> None:
    for name in ("grpo", "dapo", "dr_grpo"):
        config = algo(name, kl_coef=0.0)
        adv = compute_advantages_by_algorithm(config, jnp.full((2, 4), 0.75)).reshape(-1)
        assert adv.tolist() == [0.0] * 8
        grads = loss_grads(model, rb._replace(advantages_B=adv), config, gen)
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads)), name
    # the same batch with a reward spread has a non-zero gradient
    spread = compute_advantages_by_algorithm(algo("grpo"), jnp.arange(8.0).reshape(2, 4)).reshape(-1)
    grads = loss_grads(model, rb._replace(advantages_B=spread), algo("grpo", kl_coef=0.0), gen)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0
    # and training_step on the equal-reward batch leaves the weights exactly as they were
    st, fz = init_train_state(model, TrainConfig())
    p1, _, m = training_step(st.params, st.opt_state, rb._replace(advantages_B=adv), algo("grpo", kl_coef=0.0),
                             frozen=fz, optimizer=make_optimizer(TrainConfig()),
                             allowed_token_ids=gen.allowed_token_ids)
    assert float(m["grad_norm"]) == 0.0 and leaves_equal(p1, st.params)


def test_importance_weights_scale_the_policy_gradient(model, rb, gen) -> None:
    config = algo("grpo", kl_coef=0.0)
    adv = compute_advantages_by_algorithm(config, jnp.arange(8.0).reshape(2, 4)).reshape(-1)
    b = rb._replace(advantages_B=adv)
    g1 = loss_grads(model, b, config, gen)
    g2 = loss_grads(model, b, config, gen, weights=jnp.full(b.loss_mask_B_T.shape, 2.0))
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(y), 2 * np.asarray(x), rtol=1e-5, atol=1e-8)


def test_kl_fn_changes_only_the_kl_term(model, rb, gen) -> None:
    st, fz = init_train_state(model, TrainConfig())
    lp, _ = token_logprobs(model, rb.tokens_B_T, rb.attention_mask_B_T, allowed_token_ids=gen.allowed_token_ids)
    ref = (lp + 0.3 * rb.loss_mask_B_T) * rb.loss_mask_B_T  # a reference that differs from the policy
    config = algo("grpo", kl_coef=0.05)
    adv = compute_advantages_by_algorithm(config, jnp.arange(8.0).reshape(2, 4)).reshape(-1)
    b = rb._replace(advantages_B=adv)
    kw = dict(frozen=fz, optimizer=make_optimizer(TrainConfig()), ref_logprobs_B_T=ref,
              allowed_token_ids=gen.allowed_token_ids)
    k1 = lambda logp, ref_logp: logp - ref_logp
    _, _, m3 = training_step(st.params, st.opt_state, b, config, **kw)
    _, _, m1 = training_step(st.params, st.opt_state, b, config, kl_fn=k1, **kw)
    assert float(m1["policy_loss"]) == float(m3["policy_loss"])
    assert float(m1["clip_fraction"]) == float(m3["clip_fraction"])
    mask = b.loss_mask_B_T
    want = {e: float(compute_per_token_kl(lp * mask, ref, mask, estimator=e).sum() / mask.sum()) for e in ("k1", "k3")}
    np.testing.assert_allclose([float(m1["kl"]), float(m3["kl"])], [want["k1"], want["k3"]], rtol=1e-4)
    assert float(m1["loss"]) != float(m3["loss"])


def test_loss_fn_and_ref_update_fn_are_swapped_in(model, renderer, cfg) -> None:
    seen = []

    def my_loss(config, batch):
        seen.append(sorted(batch))
        return algorithm_loss(config, batch)

    st, fz = init_train_state(model, cfg)
    base = RolloutProvider(fz, renderer, PROBLEMS, digit_reward, cfg)
    s0, m0 = training_iteration(st, base, cfg, fns=TrainFns(make_optimizer(cfg)))
    s1, m1 = training_iteration(st, base, cfg, fns=TrainFns(make_optimizer(cfg), loss_fn=my_loss))
    assert seen == [["advantages_B", "entropy_B_T", "logprobs_B_T", "mask_B_T", "old_logprobs_B_T"]]
    assert leaves_equal(state_arrays(s0), state_arrays(s1)) and untimed(m0) == untimed(m1)
    # a reference updater moves the reference only: the trained weights are those of the fixed-reference run
    s2, _ = training_iteration(st, base, cfg, fns=TrainFns(make_optimizer(cfg), ref_model_update_fn=create_ema_updater(0.5)))
    assert leaves_equal(s2.params, s0.params) and leaves_equal(s0.ref_params, st.params)
    for r, p0, p1 in zip(jax.tree.leaves(s2.ref_params), jax.tree.leaves(st.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(r), 0.5 * np.asarray(p0) + 0.5 * np.asarray(p1), rtol=1e-6, atol=1e-7)
    # a loss that ignores the policy (zero loss) trains nothing
    zero = lambda config, batch: (jnp.sum(batch["logprobs_B_T"]) * 0.0, {})
    s3, m3 = training_iteration(st, base, cfg, fns=TrainFns(make_optimizer(cfg), loss_fn=zero))
    assert leaves_equal(s3.params, st.params) and m3["grad_norm"] == 0.0 and m3["reward/mean"] == m0["reward/mean"]


@dataclass
class CountingGenerator:
    "Delegates to the KV-cache sampler and counts the calls."
    inner: KVCacheGenerator
    calls: Counter = field(default_factory=Counter)

    def generate(self, *args, **kw):
        self.calls["generate"] += 1
        return self.inner.generate(*args, **kw)

    def logprobs(self, *args, **kw):
        self.calls["logprobs"] += 1
        return self.inner.logprobs(*args, **kw)

    def update_weights(self, model) -> None:
        self.calls["update_weights"] += 1


def test_the_generator_changes_only_the_sampling(model, renderer, tok, cfg) -> None:
    st, fz = init_train_state(model, cfg)
    fns = TrainFns(make_optimizer(cfg))
    s0, m0 = training_iteration(st, RolloutProvider(fz, renderer, PROBLEMS, digit_reward, cfg), cfg, fns=fns)
    counting = CountingGenerator(KVCacheGenerator(tok.pad_id))
    s1, m1 = training_iteration(st, RolloutProvider(fz, renderer, PROBLEMS, digit_reward, cfg, generator=counting),
                                cfg, fns=fns)
    assert counting.calls == Counter(generate=1, update_weights=1)  # one batched call for all P x G rollouts
    assert leaves_equal(state_arrays(s0), state_arrays(s1)) and untimed(m0) == untimed(m1)
    # a scripted sampler: every rollout is its script, and the reward is that of the script
    script = ScriptedGenerator(tok, [["777<|im_end|>"] if i >= 8 else ["337<|im_end|>"] for i in range(16)],
                               pad_id=tok.pad_id)
    provider = RolloutProvider(fz, renderer, PROBLEMS, digit_reward, cfg, generator=script)
    s2, m2 = training_iteration(st, provider, cfg, fns=fns)
    texts = [final_text(r) for g in provider.last_groups for r in g.rollouts]
    assert texts == ["337"] * 8 + ["777"] * 8
    assert m2["reward/mean"] == 0.625 and m2["reward/zero_spread_fraction"] == 1.0 and m2["grad_norm"] == 0.0
    assert m2["stop/completed"] == 1.0 and m2["length/mean"] == 4.0


def test_schedule_switches_mid_training_with_one_trace_per_distinct_config(model, renderer, cfg) -> None:
    traces = Counter()

    def counting_loss(config, batch):
        traces[(config.name, config.kl_coef)] += 1  # runs only while JAX traces the kernel
        return algorithm_loss(config, batch)

    grpo, grpo_kl, dapo = algo("grpo", kl_coef=0.0), algo("grpo", kl_coef=0.05), algo("dapo")
    schedule = AlgorithmSchedule(milestones=((0, grpo), (2, grpo_kl), (4, dapo), (6, grpo)))
    loop = train(model, renderer, PROBLEMS, digit_reward, 8, config=cfg, schedule=schedule, loss_fn=counting_loss)
    assert traces == Counter({("grpo", 0.0): 1, ("grpo", 0.05): 1, ("dapo", 0.0): 1})
    assert loop.metric("algorithm/index")[1].tolist() == [0, 0, 1, 1, 2, 2, 0, 0]
    kl = loop.metric("kl")[1]
    assert np.all(kl[2:] > 0), kl  # the policy has left the reference; the KL is reported in every phase
    assert loop.metric("clip_fraction_high")[1].shape == (8,)
    loop.run(2)  # more iterations, same program
    assert sum(traces.values()) == 3
    again = train(model, renderer, PROBLEMS, digit_reward, 2, config=cfg, schedule=schedule, loss_fn=counting_loss)
    assert sum(traces.values()) == 3 and again._spec.traces == 0  # a second train() alike reuses the programs


def test_train_makes_the_reward_rise(model, renderer, cfg) -> None:
    loop = train(model, renderer, PROBLEMS, digit_reward, 20, config=cfg)
    reward = loop.metric("reward/mean")[1]
    assert reward[:3].mean() < 0.2 and reward[-3:].mean() > 0.5, reward
    assert int(loop.state.policy_version) == 20 and loop.step_count == 20


def test_train_resume_continues_bit_exactly(model, renderer, cfg, tmp_path) -> None:
    kw = dict(config=cfg.model_copy(update={"algorithm": algo("grpo", kl_coef=0.05), "inner_steps": 2}),
              ref_model_update_fn=create_ema_updater(0.9))
    full = train(model, renderer, PROBLEMS, digit_reward, 4, checkpoint_dir=tmp_path / "a", **kw)
    half = train(model, renderer, PROBLEMS, digit_reward, 2, checkpoint_dir=tmp_path / "b", **kw)
    resumed = train(model, renderer, PROBLEMS, digit_reward, 0, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.step_count == 2 and leaves_equal(state_arrays(resumed.state), state_arrays(half.state))
    resumed.run(2)
    assert leaves_equal(state_arrays(resumed.state), state_arrays(full.state))
    assert [untimed(r) for r in half.history + resumed.history] == [untimed(r) for r in full.history]


def test_lora_trains_and_checkpoints_only_the_adapters(model, renderer, cfg, tmp_path) -> None:
    lora = lora_init(model, LoraConfig(rank=2, targets=("wq", "wv", "w_up")), key=jax.random.key(2))
    loop = train(lora, renderer, PROBLEMS, digit_reward, 3, config=cfg, checkpoint_dir=tmp_path)
    assert len(jax.tree.leaves(loop.state.params)) == 6  # A and B of three weights
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(loop.state.params), jax.tree.leaves(loop.state.ref_params))]
    assert any(moved)
    state, _, step = CheckpointManager(tmp_path, create=False).restore(loop.state, TrainConfig)
    assert step == 3 and leaves_equal(state_arrays(state), state_arrays(loop.state))
    n_base = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    n_saved = sum(x.size for x in jax.tree.leaves(state_arrays(loop.state)))
    assert n_saved < n_base / 4  # the frozen base is not in the checkpoint


def test_eval_fn_and_checkpoint_fn_run_on_their_period(model, renderer, cfg, tmp_path) -> None:
    evals, saves = [], []

    def eval_fn(m, iteration):
        evals.append(iteration)
        return {"norm": float(jnp.abs(m.embed_V_D).sum())}

    loop = train(model, renderer, PROBLEMS, digit_reward, 4, config=cfg, eval_fn=eval_fn, eval_every=2,
                 checkpoint_dir=tmp_path, save_every=2, checkpoint_fn=lambda lp: saves.append(lp.step_count))
    assert evals == [2, 4] and saves == [2, 4]
    assert loop.metric("eval/norm")[0].tolist() == [2, 4]


def test_rollout_stats_count_stop_reasons_and_tool_success(model, renderer, tok, gen) -> None:
    groups = create_batch_rollouts(Policy(model, KVCacheGenerator(tok.pad_id)), renderer, ["Write 3s", "Write 7s"],
                                   gen, jax.random.key(1), group_size=2, reward_fn=digit_reward,
                                   metadata=[{"digit": "3"}, {"digit": "7"}])
    ok, bad = ToolResult("add", "c0", "5"), ToolResult("add", "c1", "error: timeout", "timeout", 10.0)
    (a, b), (c, d) = (g.rollouts for g in groups)
    a = a._replace(tool_results=(ok, ok, bad), stop_reason="max_turns")
    b = b._replace(stop_reason="parse_error")
    groups = (groups[0]._replace(rollouts=(a, b)), groups[1]._replace(rollouts=(c._replace(rewards_K=np.ones(1, np.float32)),
                                                                           d._replace(rewards_K=np.ones(1, np.float32)))))
    stats = rollout_stats(groups, batch_from_rollouts(groups))
    assert stats["tools/calls_per_rollout"] == 0.75 and stats["tools/success_rate"] == pytest.approx(2 / 3)
    assert (stats["stop/max_turns"], stats["stop/parse_error"]) == (0.25, 0.25)
    assert sum(v for k, v in stats.items() if k.startswith("stop/")) == pytest.approx(1.0)
    assert stats["reward/zero_spread_fraction"] >= 0.5  # the second group's rewards are all 1
    lengths = [float(r.loss_mask_T.sum()) for g in groups for r in g.rollouts]
    assert stats["length/mean"] == pytest.approx(np.mean(lengths))


def test_bad_arguments_say_what_to_fix(model, renderer, cfg, tmp_path) -> None:
    with pytest.raises(ValueError, match="resume=True needs the checkpoint_dir"):
        train(model, renderer, PROBLEMS, digit_reward, 1, config=cfg, resume=True)
    with pytest.raises(ValueError, match="pad_to=2"):
        train(model, renderer, PROBLEMS, digit_reward, 1, config=cfg.model_copy(update={"pad_to": 2}))
    with pytest.raises(TypeError, match="received int"):
        train(model, renderer, [3], digit_reward, 1, config=cfg)


@dataclass(frozen=True)
class OffSampler:
    "A sampler whose reported log-probabilities are `shift` below the trainer's (other numerics, stale weights)."
    inner: KVCacheGenerator
    shift: float = 1.0

    def generate(self, *args, **kw):
        g = self.inner.generate(*args, **kw)
        return g._replace(logprobs_B_T=g.logprobs_B_T - self.shift * g.mask_B_T)

    def logprobs(self, *args, **kw):
        return self.inner.logprobs(*args, **kw)

    def update_weights(self, model) -> None:
        pass


def test_importance_correction_when_sampler_and_trainer_differ(model, renderer, tok, cfg) -> None:
    tis = cfg.model_copy(update={"is_correction": "truncate", "is_cap": 2.0})
    st, fz = init_train_state(model, tis)
    fns = TrainFns(make_optimizer(tis))
    _, same = training_iteration(st, RolloutProvider(fz, renderer, PROBLEMS, digit_reward, tis), tis, fns=fns)
    assert abs(same["is/weight_mean"] - 1.0) < 1e-4 and same["is/capped_fraction"] == 0.0
    off = OffSampler(KVCacheGenerator(tok.pad_id))
    s1, m1 = training_iteration(st, RolloutProvider(fz, renderer, PROBLEMS, digit_reward, tis, generator=off), tis,
                                fns=fns)
    assert m1["is/capped_fraction"] == 1.0 and abs(m1["is/weight_mean"] - 2.0) < 1e-5  # e^1 > C = 2: capped
    assert abs(m1["is/sampler_kl"] - (np.exp(-1.0) - 1 + 1.0)) < 1e-4  # k3 at log w = 1
    # the ratio is taken against the trainer's own log-probabilities, so it starts at 1: nothing is clipped
    assert abs(m1["ratio_mean"] - 1.0) < 1e-4 and m1["clip_fraction"] == 0.0
    masked = tis.model_copy(update={"is_correction": "mask"})
    _, m2 = training_iteration(st, RolloutProvider(fz, renderer, PROBLEMS, digit_reward, masked, generator=off),
                               masked, fns=TrainFns(make_optimizer(masked)))
    assert m2["is/weight_mean"] == 0.0 and m2["grad_norm"] == 0.0  # every token is past the cut-off
    # without a correction the ratio is against the sampler's numbers: e^1, so clipped wherever it counts
    _, m3 = training_iteration(st, RolloutProvider(fz, renderer, PROBLEMS, digit_reward, cfg, generator=off), cfg,
                               fns=TrainFns(make_optimizer(cfg)))
    assert abs(m3["ratio_mean"] - np.e) < 1e-3


def test_mlflow_telemetry_receives_params_metrics_and_evals(model, renderer, cfg, mlflow_server, tmp_path) -> None:
    from mlflow import MlflowClient

    from researchlab.design.mlflow_telemetry import MLFlowTelemetry

    tel = MLFlowTelemetry(tracking_uri=mlflow_server.uri, experiment="llm-train", spool_dir=tmp_path)
    schedule = AlgorithmSchedule(milestones=((0, algo("grpo", kl_coef=0.0)), (2, algo("dapo"))))
    loop = train(model, renderer, PROBLEMS, digit_reward, 3, config=cfg, schedule=schedule, logger=tel,
                 eval_fn=lambda m, it: {"iteration": float(it)}, eval_every=3)
    loop.close()
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(tel.run_id)
    assert run.data.params["generation.max_new_tokens"] == "4" and run.data.params["group_size"] == "8"
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(tel.run_id, key)]
    assert [s for s, _ in history("reward/mean")] == [1, 2, 3]
    assert history("algorithm/index") == [(1, 0.0), (2, 0.0), (3, 1.0)]
    assert history("eval/iteration") == [(3, 3.0)]
    assert {"stop/completed", "clip_fraction", "kl", "entropy", "length/mean", "tools/success_rate",
            "reward/zero_spread_fraction"} <= set(run.data.metrics)


def add(
    a: int,  # first term
    b: int,  # second term
) -> int:
    "Add two integers."
    return a + b


def test_multiturn_tool_groups_train_and_report_tool_success(tok) -> None:
    from functools import partial

    from researchlab.llm.chat import HERMES_TEMPLATE
    from researchlab.llm.envs import EnvGroup, ToolEnv
    from researchlab.llm.rollouts import as_conversation

    renderer = Renderer(tok, HERMES_TEMPLATE)
    big = init_llama(ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                 hidden_dim=32, max_seq_len=1024), key=jax.random.key(0))
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call><|im_end|>'
    script = ScriptedGenerator(tok, [[call, "5<|im_end|>"], [bad, "5<|im_end|>"]], pad_id=tok.pad_id)
    builder = EnvGroup(partial(ToolEnv, renderer, as_conversation("What is 2 plus 3?"), [add]), group_size=2,
                       metadata={"answer": "5"})
    config = TrainConfig(num_prompts=1, group_size=2, generation=GenerationConfig(max_new_tokens=120),
                         algorithm=algo("grpo", kl_coef=0.0))
    reward = lambda r: float(final_text(r) == r.metadata["answer"])
    st, fz = init_train_state(big, config)
    provider = RolloutProvider(fz, renderer, [builder], reward, config, generator=script)
    s1, m = training_iteration(st, provider, config, fns=TrainFns(make_optimizer(config)))
    (group,) = provider.last_groups
    assert [len(r.tool_results) for r in group.rollouts] == [1, 1]
    assert (m["tools/calls_per_rollout"], m["tools/success_rate"]) == (1.0, 0.5)  # the second call lacks `b`
    assert (m["turns/mean"], m["stop/completed"], m["reward/mean"]) == (2.0, 1.0, 1.0)
    assert int(s1.policy_version) == 1


def assert_trees_close(a, b, rtol: float = 1e-5, atol: float = 0.0) -> None:
    "Every leaf of `a` within `rtol` of `b` relative to the leaf's largest entry (entries near 0 included), or `atol`."
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=max(atol, rtol * float(np.abs(y).max(initial=0.0))))


def shapes_in_jaxpr(jaxpr) -> set[tuple[int, ...]]:
    "Shapes of every value a (closed) jaxpr and the jaxprs nested in it (scan, map, cond bodies) compute."
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    out = set()
    for eqn in jaxpr.eqns:
        out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for p in eqn.params.values():
            for q in p if isinstance(p, (tuple, list)) else (p,):
                if hasattr(q, "eqns") or hasattr(getattr(q, "jaxpr", None), "eqns"):
                    out |= shapes_in_jaxpr(q)
    return out


@pytest.mark.parametrize("name,kl", [("grpo", 0.05), ("dapo", 0.0), ("dr_grpo", 0.0)])  # sequence, token, constant
def test_micro_batched_step_equals_the_whole_batch_step(model, rb, gen, name, kl) -> None:
    config = algo(name, kl_coef=kl)
    st, fz = init_train_state(model, TrainConfig())
    opt = make_optimizer(TrainConfig())
    mask = rb.loss_mask_B_T
    wiggle = 0.3 * jnp.sin(jnp.arange(mask.size, dtype=jnp.float32)).reshape(mask.shape) * mask
    rb_ = rb._replace(logprobs_B_T=rb.logprobs_B_T + wiggle,  # pi_old != pi_theta: ratios, clipping, approx_kl
                      ref_logprobs_B_T=(rb.logprobs_B_T - wiggle) * mask, advantages_B=jnp.linspace(-1.0, 1.0, 8))
    weights = jnp.linspace(0.5, 1.5, rb.tokens_B_T.size).reshape(rb.tokens_B_T.shape) * rb.loss_mask_B_T
    kw = dict(frozen=fz, optimizer=opt, allowed_token_ids=gen.allowed_token_ids, is_weights_B_T=weights)
    whole = training_step(st.params, st.opt_state, rb_, config, **kw)
    assert rb.tokens_B_T.shape[0] == 8
    for m in (1, 3, 4):  # 3: the last micro-batch is filled with repeated rows
        micro = training_step(st.params, st.opt_state, rb_, config, micro_batch_size=m, **kw)
        assert_trees_close(micro[1], whole[1])  # Adam's moments: the (clipped) gradient itself
        assert_trees_close(micro[0], whole[0])
        assert_trees_close(micro[2], whole[2], atol=1e-7)  # loss, grad_norm and every diagnostic
    assert float(whole[2]["grad_norm"]) > 0 and float(whole[2]["clip_fraction"]) > 0


def test_micro_batched_step_is_exact_for_a_loss_that_uses_the_entropy(model, rb, gen) -> None:
    def entropy_bonus(config, batch):
        loss, aux = algorithm_loss(config, batch)
        m = batch["mask_B_T"]
        return loss - 0.1 * (batch["entropy_B_T"] * m).sum() / m.sum(), aux

    st, fz = init_train_state(model, TrainConfig())
    kw = dict(frozen=fz, optimizer=make_optimizer(TrainConfig()), allowed_token_ids=gen.allowed_token_ids,
              loss_fn=entropy_bonus)
    grpo = algo("grpo", kl_coef=0.0)
    whole = training_step(st.params, st.opt_state, rb, grpo, **kw)
    micro = training_step(st.params, st.opt_state, rb, grpo, micro_batch_size=3, **kw)
    assert_trees_close(micro[:2], whole[:2])
    assert_trees_close(micro[2], whole[2], atol=1e-7)
    plain = training_step(st.params, st.opt_state, rb, grpo, **{**kw, "loss_fn": None})
    assert not np.allclose(np.asarray(plain[2]["grad_norm"]), np.asarray(whole[2]["grad_norm"]))


def test_micro_batched_passes_hold_no_whole_batch_logits(model, rb, gen) -> None:
    st, fz = init_train_state(model, TrainConfig())
    b, t = rb.tokens_B_T.shape
    whole_logits = (b, t - 1, model.embed_V_D.shape[0])
    for m, expect in ((None, True), (4, False)):
        step = jax.make_jaxpr(lambda p, o, m=m: training_step(
            p, o, rb, algo("grpo", kl_coef=0.0), frozen=fz, optimizer=make_optimizer(TrainConfig()),
            allowed_token_ids=gen.allowed_token_ids, micro_batch_size=m))(st.params, st.opt_state)
        assert (whole_logits in shapes_in_jaxpr(step)) is expect
        ref = jax.make_jaxpr(lambda mod, m=m: get_reference_logprobs(mod, rb, micro_batch_size=m))(model)
        assert (whole_logits in shapes_in_jaxpr(ref)) is expect


def test_micro_batched_training_iteration_matches_the_whole_batch(model, renderer, cfg) -> None:
    base = cfg.model_copy(update={"algorithm": algo("grpo", kl_coef=0.05), "inner_steps": 2,
                                  "is_correction": "truncate"})
    results = []
    for m in (None, 3):
        config = base.model_copy(update={"micro_batch_size": m})
        fns = TrainFns(make_optimizer(config))
        state, frozen = init_train_state(model, config)
        provider = RolloutProvider(frozen, renderer, PROBLEMS, digit_reward, config)
        results.append(training_iteration(state, provider, config, fns=fns))
    (s_whole, m_whole), (s_micro, m_micro) = results
    assert_trees_close(state_arrays(s_micro), state_arrays(s_whole))
    assert int(s_micro.policy_version) == 1 and int(s_micro.clock.step) == 1
    m_whole, m_micro = untimed(m_whole), untimed(m_micro)
    assert m_micro.keys() == m_whole.keys() and m_whole["kl"] > 0
    np.testing.assert_allclose([m_micro[k] for k in m_whole], list(m_whole.values()), rtol=1e-5, atol=1e-7)


def test_sample_time_excludes_the_unfinished_update(model, renderer, cfg) -> None:
    "The Loop dispatches the update asynchronously: `time/sample_s` must not hold the wait for it (it once did)."
    state, frozen = init_train_state(model, cfg)
    provider = RolloutProvider(frozen, renderer, PROBLEMS, digit_reward, cfg)
    provider.get_batch(state)  # compiles the sampler

    @jax.jit
    def slow(state):  # the state unchanged, after a second or more of matmuls (an update still running)
        busy = jax.lax.fori_loop(0, 300, lambda i, m: jnp.tanh(m @ m), jnp.full((512, 512), 0.01, jnp.float32))
        return jax.tree.map(lambda x: x + (0 * busy[0, 0]).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                            else x, state)

    jax.block_until_ready(slow(state))  # compiled
    t0 = time.perf_counter()
    jax.block_until_ready(slow(state))
    busy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = provider.get_batch(slow(state))  # returns at once: the State is still being computed
    total_s = time.perf_counter() - t0
    sample_s = float(batch.stats["time/sample_s"])
    assert busy_s > 0.3, busy_s  # the wait is long enough to tell apart
    assert sample_s < total_s - 0.5 * busy_s, (sample_s, total_s, busy_s)

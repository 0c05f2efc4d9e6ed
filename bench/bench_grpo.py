"""One GRPO iteration of `researchlab.llm.train` on SmolLM2-135M-Instruct (LoRA on wq/wv), CPU: the time split into
sampling (rollouts through `RolloutProvider`: envs, sampler, decoding, rewards), batching, reference log-probabilities
(`get_reference_logprobs`, jitted) and the update (`update_iteration`: the trainer's log-probabilities, the loss and
`inner_steps` Adam steps, jitted), and the sampling phase's tokens/s against the generator alone (`kv_generate` on
the same prompts, batch and length). Compilation is timed on its own (the first iteration) and not counted.
The reference pass and the update go through the model `--micro-batch` rows at a time (`TrainConfig.micro_batch_size`:
the gradient is the whole batch's), so no `[B, T, V]` logits of the whole batch are held.

Default shape (issue 16): 16 prompts x 8 samples x 64 new tokens. Rows sample at temperature 1; a row stops at
`<|im_end|>`, so the sampling phase's tokens are those actually sampled; the generator-alone row samples the same
batch with no stop token (exactly `--new-tokens` per row), an upper bound on its work. No speed target: the figures
are reported (the ratio `rollout tokens/s / generator tokens/s` says what the rollout machinery costs).

    python bench/bench_grpo.py [--prompts 16] [--group 8] [--new-tokens 64] [--inner-steps 1] [--micro-batch 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from researchlab.llm.chat import CHATML_TEMPLATE
from researchlab.llm.generate import kv_generate, left_pad
from researchlab.llm.lora import LoraConfig, lora_init
from researchlab.llm.rewards import numeric_match_reward
from researchlab.llm.rollouts import Renderer, as_conversation, batch_from_rollouts, render_prompt
from researchlab.llm.train import (
    IterationBatch,
    Problem,
    RolloutProvider,
    TrainConfig,
    TrainFns,
    get_reference_logprobs,
    init_train_state,
    jit_update_fn,
    make_optimizer,
    rollout_stats,
)
from researchlab.llm.types import GenerationConfig
from researchlab.rl.algorithms import create_algorithm_config


def problems(n: int) -> list[Problem]:
    "n arithmetic word problems with their answers."
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(2, 50, 2))
        out.append(Problem(f"Tom has {a} apples and buys {b} more. How many apples does he have now? "
                           "Answer with the number.", {"answer": str(a + b)}))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=16, help="rows per forward/backward pass; 0: the whole batch")
    args = ap.parse_args(argv)
    try:
        from researchlab.llm.models import load_model
        from researchlab.llm.tokenizers import load_tokenizer
        tok, base = load_tokenizer(), load_model()
    except (FileNotFoundError, ImportError) as e:
        print(f"bench_grpo: skipped, SmolLM2-135M-Instruct is not installed ({e}); run `make llm-model`")
        return 0
    renderer = Renderer(tok, CHATML_TEMPLATE)
    model = lora_init(base, LoraConfig(rank=8), key=jax.random.key(0))
    P, G, N = args.prompts, args.group, args.new_tokens
    gen = GenerationConfig(max_new_tokens=N, temperature=1.0)
    cfg = TrainConfig(num_prompts=P, group_size=G, inner_steps=args.inner_steps, lr=1e-4, generation=gen,
                      algorithm=create_algorithm_config("grpo", kl_coef=0.04), pad_multiple=64,
                      micro_batch_size=args.micro_batch or None)
    state, frozen = init_train_state(model, cfg)
    provider = RolloutProvider(frozen, renderer, problems(P), numeric_match_reward(), cfg)
    fns = TrainFns(make_optimizer(cfg))
    update = jit_update_fn(fns)
    ref_fn = jax.jit(partial(get_reference_logprobs, micro_batch_size=cfg.micro_batch_size))
    rows = []

    def iteration(state, label: str):
        t0 = time.perf_counter()
        groups = provider.rollouts(state)
        t1 = time.perf_counter()
        rb = batch_from_rollouts(groups, pad_multiple=cfg.pad_multiple, pad_id=tok.pad_id)
        t2 = time.perf_counter()
        sampled = int(sum(r.loss_mask_T.sum() for g in groups for r in g.rollouts))
        try:
            ref = jax.block_until_ready(ref_fn(eqx.combine(state.ref_params, frozen), rb))
            t3 = time.perf_counter()
            ib = IterationBatch(rb._replace(ref_logprobs_B_T=ref), frozen,
                                {k: jnp.asarray(v, jnp.float32) for k, v in rollout_stats(groups, rb).items()})
            new_state, metrics = jax.block_until_ready(update(state, cfg, ib))
            t4 = time.perf_counter()
        except jax.errors.JaxRuntimeError as e:  # RESOURCE_EXHAUSTED: the [B, T, V] logits of one pass
            b, t = rb.tokens_B_T.shape
            print(f"bench_grpo: {label} iteration: the update ran out of memory ({str(e).splitlines()[0][:120]}); "
                  f"one pass holds logits [B={b}, T={t}, V={tok.vocab_size}] = {b * t * tok.vocab_size * 4 / 2**30:.1f} "
                  f"GiB in float32, several times over with the gradient; micro-batches of {cfg.micro_batch_size} "
                  f"rows hold {cfg.micro_batch_size or b}/{b} of it: lower --micro-batch. "
                  f"Sampling took {t1 - t0:.1f} s for {sampled} tokens ({sampled / (t1 - t0):,.0f} tokens/s)")
            sys.exit(1)
        rows.append((label, t1 - t0, t2 - t1, t3 - t2, t4 - t3, sampled, tuple(rb.tokens_B_T.shape),
                     float(metrics["reward/mean"])))
        return new_state

    state = iteration(state, "first (compiles)")
    iteration(state, "timed")
    # the generator alone: the same prompts, batch and length, no stop token
    prompts = [render_prompt(renderer, as_conversation(p.prompt)) for p in problems(P) for _ in range(G)]
    ids, mask = left_pad(prompts, tok.pad_id)
    policy_model = provider.policy(state).model
    gcfg = GenerationConfig(max_new_tokens=N, temperature=1.0)
    jax.block_until_ready(kv_generate(policy_model, jnp.asarray(ids), jnp.asarray(mask), gcfg, jax.random.key(1)))
    t0 = time.perf_counter()
    jax.block_until_ready(kv_generate(policy_model, jnp.asarray(ids), jnp.asarray(mask), gcfg, jax.random.key(2)))
    t_gen = time.perf_counter() - t0

    print(f"SmolLM2-135M-Instruct + LoRA r=8 (wq, wv), {P} prompts x {G} samples x {N} new tokens, "
          f"inner_steps={args.inner_steps}, micro-batch {cfg.micro_batch_size or 'off'}, {jax.devices()[0].platform}")
    print(f"{'iteration':<18}{'sampling s':>11}{'batching s':>11}{'ref lp s':>10}{'update s':>10}{'total s':>9}"
          f"{'sampled':>9}{'batch [B,T]':>13}{'reward':>8}")
    for label, ts, tb, tr, tu, n, shape, reward in rows:
        print(f"{label:<18}{ts:>11.2f}{tb:>11.3f}{tr:>10.2f}{tu:>10.2f}{ts + tb + tr + tu:>9.2f}{n:>9d}"
              f"{str(list(shape)):>13}{reward:>8.3f}")
    _, ts, tb, tr, tu, n, _, _ = rows[-1]
    total = ts + tb + tr + tu
    print(f"share of the timed iteration: sampling {ts / total:.0%}, batching {tb / total:.1%}, "
          f"reference log-probs {tr / total:.0%}, update {tu / total:.0%}")
    gen_tps, roll_tps = P * G * N / t_gen, n / ts
    print(f"generator alone (kv_generate, {P * G} rows x {N} tokens, no stop): {t_gen:.2f} s, {gen_tps:,.0f} tokens/s")
    print(f"rollouts (RolloutProvider.rollouts, {n} sampled tokens): {roll_tps:,.0f} tokens/s = "
          f"{roll_tps / gen_tps:.2f}x the generator alone")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

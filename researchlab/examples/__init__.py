"""Worked examples built on researchlab, each a module of its own, imported where used.

- `researchlab.examples.ppo`: PPO on gymnax CartPole as a pure `ppo_step` on a `PPOState` (notebook 30).
- `researchlab.examples.demo`: the `rlab demo` command and its builder `ppo_experiment`, PPO end to end with tracking,
  checkpoints and a video (31a); `rlab run researchlab.examples.demo:ppo_experiment` runs the same.
- `researchlab.examples.cartpole_render`: a `jax.numpy` CartPole renderer and `CartPoleVisualizer` (32).
- `researchlab.examples.grpo_tiny`: GRPO on a tiny transformer with a verifiable reward (33).

They bring in gymnax or a model of their own, so neither `import researchlab` nor `import researchlab.examples`
imports them: `from researchlab.examples.ppo import PPOConfig, ppo_step`.
Written by hand; nbdev leaves it alone.
"""

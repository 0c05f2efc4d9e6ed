"""LLM post-training in pure JAX: chat types, tokenizers, chat templates with loss masks, a Llama-family
decoder that loads SmolLM2 from GGUF, a jittable KV-cache sampler, and LoRA adapters as a PyTree transform.

Written by hand (nbdev leaves it alone). The modules are imported by name
(`from researchlab.llm.types import Message`), so `import researchlab.llm` itself costs nothing: each of
`types`, `tokenizers`, `chat`, `models`, `generate` and `lora` imports its own dependencies (JAX, `tokenizers`,
`gguf`, `jinja2`) only when it is imported.
"""

# Part 2, post-training around the model (one module each, imported by name like the above): `tools` (tool calls
# read, run with timeouts, counted), `rollouts` (Rollout data, the async Env protocol, batched sampling of envs),
# `envs` (multi-turn tool use), `rewards` (reward functions over rollouts, reward models), `view` (a rollout's tokens
# as HTML coloured by loss mask and advantage, rollouts stored in and read back from the MLflow run).

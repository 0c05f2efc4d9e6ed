"""Functional RL primitives in pure JAX: advantages, policy losses, KL, rewards, reference updates and algorithm configs.

Written by hand (nbdev leaves it alone): the public names of the `researchlab.rl` modules are re-exported here by
name, so `from researchlab.rl import compute_grpo_loss` works. The argument checks those modules share (shape
errors, float dtype, masked statistics) stay in their own module, `researchlab.rl.checks`.
"""

from researchlab.rl.advantages import (
    Scale,
    compute_grpo_advantages,
    compute_ppo_advantages,
    normalize_advantages,
)
from researchlab.rl.algorithms import (
    ALGORITHM_PRESETS,
    LOSS_FNS,
    AlgorithmConfig,
    AlgorithmLossFn,
    AlgorithmSchedule,
    LossBatch,
    compute_advantages_by_algorithm,
    compute_loss_by_algorithm,
    create_algorithm_config,
)
from researchlab.rl.kl import (
    KLEstimator,
    KLFn,
    KLReduction,
    compute_batch_kl,
    compute_forward_kl,
    compute_per_token_kl,
    compute_reverse_kl,
    create_adaptive_kl,
    create_truncated_kl,
    update_kl_coef,
)
from researchlab.rl.losses import (
    LossAggregation,
    aggregate_loss,
    compute_dapo_loss,
    compute_dpo_loss,
    compute_grpo_loss,
    compute_ppo_loss,
    sequence_logprobs,
    token_logprobs_and_entropy,
)
from researchlab.rl.reference import (
    RefUpdateFn,
    create_ema_updater,
    create_periodic_updater,
    create_reference_model,
)
from researchlab.rl.rewards import (
    ShapingFn,
    aggregate_vector_rewards,
    apply_reward_shaping,
    compute_dynamic_sampling_mask,
    compute_overlong_punishment,
    create_overlong_shaping,
    normalize_rewards,
)

__all__ = [
    "Scale",
    "compute_ppo_advantages",
    "compute_grpo_advantages",
    "normalize_advantages",
    "LossAggregation",
    "aggregate_loss",
    "compute_ppo_loss",
    "compute_grpo_loss",
    "compute_dapo_loss",
    "token_logprobs_and_entropy",
    "sequence_logprobs",
    "compute_dpo_loss",
    "KLFn",
    "KLEstimator",
    "KLReduction",
    "compute_per_token_kl",
    "compute_reverse_kl",
    "compute_forward_kl",
    "create_truncated_kl",
    "create_adaptive_kl",
    "compute_batch_kl",
    "update_kl_coef",
    "ShapingFn",
    "aggregate_vector_rewards",
    "normalize_rewards",
    "apply_reward_shaping",
    "compute_overlong_punishment",
    "create_overlong_shaping",
    "compute_dynamic_sampling_mask",
    "RefUpdateFn",
    "create_reference_model",
    "create_ema_updater",
    "create_periodic_updater",
    "ALGORITHM_PRESETS",
    "LossBatch",
    "AlgorithmLossFn",
    "LOSS_FNS",
    "AlgorithmConfig",
    "create_algorithm_config",
    "compute_loss_by_algorithm",
    "compute_advantages_by_algorithm",
    "AlgorithmSchedule",
]

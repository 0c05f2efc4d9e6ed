"""researchlab: a Jupyter-first workbench for ML and RL research in JAX.

The public names of the library modules (design, tracking, rl, llm) are reachable from here
(`from researchlab import Config, Loop, ...`), but each is imported only when first used (PEP 562): `import
researchlab` costs no more than the interpreter start, `researchlab.Config` imports `researchlab.design.core`
(and JAX) and nothing else, `researchlab.ExperimentTracker` brings in MLflow and GitPython. `_EXPORTS` below
is the one table of which name lives where. The worked examples (PPO on gymnax, the CartPole renderer, GRPO on
a tiny transformer, the `rlab demo` command) live in `researchlab.examples` and are imported from there.
This file is written by hand; nbdev leaves it alone.
"""

import importlib as _importlib

__version__ = "0.0.1"

# module -> the public names it defines (the type variables S, C, T stay in their modules)
_EXPORTS: dict[str, tuple[str, ...]] = {
    "researchlab.design.core": (
        "Extractor", "ConfigFileError", "Config", "State", "Clock", "is_typed_key", "next_key", "next_keys",
        "take_key", "Kernel", "SelectedKernel", "Selector", "SelectorPathError", "FieldSelector",
    ),
    "researchlab.design.utils": (
        "flatten_config", "unflatten_config", "flatten_pytree", "unflatten_pytree", "leaf_spec", "fingerprint",
        "first_difference", "ParamTableRenderer",
    ),
    "researchlab.design.data": (
        "Batch", "DataProvider", "ArrayDataProvider", "NoBatch", "keyed_permutation",
    ),
    "researchlab.design.telemetry": (
        "Scalar", "Telemetry", "ConsoleTelemetry", "MultiTelemetry",
    ),
    "researchlab.design.mlflow_rules": (
        "MAX_KEY_LENGTH", "MAX_PARAM_VALUE_LENGTH", "MAX_TAG_VALUE_LENGTH", "MAX_ENTRIES_PER_BATCH",
        "MAX_PARAMS_PER_BATCH", "KEY_CHARS", "check_key", "check_metric", "flatten_params", "param_value", "get_or_create_experiment", "active_run_id",
        "sanitize_param_key", "SECRET_ENV_VARS", "redact", "run_link", "absolute_tracking_uri",
        "TrackingServerUnreachable", "check_reachable", "prepare_sqlite_store", "store_template_path",
    ),
    "researchlab.design.mlflow_telemetry": (
        "MLFlowTelemetry", "upload_spool", "upload_main",
    ),
    "researchlab.design.persist": (
        "Persister", "CheckpointError", "CheckpointVersionError", "DiskFullError", "atomic_write", "CheckpointManager",
        "CHECKPOINT_FORMAT", "HEADER_KEYS", "fsync_dir", "is_disk_full", "disk_full_error", "crc_hex", "check_step",
        "config_json", "config_load", "leaf_array", "is_stored_leaf", "restore_leaf", "leaf_bytes",
        "state_class_name", "check_state_class", "remove_checkpoint",
    ),
    "researchlab.design.eqx_persist": (
        "EquinoxPersister",
    ),
    "researchlab.design.orbax_persist": (
        "OrbaxPersister",
    ),
    "researchlab.design.visualizer": (
        "as_frame", "VideoRecorder", "Visualizer", "clip_slider", "clips_from_mlflow",
    ),
    "researchlab.design.step_checks": (
        "ClockAccessor", "StateLayout", "check_output", "clock_getter", "find_clock", "split_state",
        "PendingMetrics", "metric_records", "thin_records", "is_due", "steps_to_due", "Callback", "check_period",
        "check_num_steps",
    ),
    "researchlab.design.loop": (  # also re-exports ClockAccessor and Callback from design.step_checks
        "Loop",
    ),
    "researchlab.design.widget": (
        "loop_widget", "LivePlot", "decimate", "smooth", "primary_metrics",
    ),
    "researchlab.design.compile_cache": (
        "CACHE_ENV", "default_cache_dir", "enable_compile_cache", "compile_cache_dir",
    ),
    "researchlab.design.population": (
        "PopulationConfig", "with_fields", "PopulationState", "stack_states", "member_state", "member_key",
        "split_member_key", "PopulationKernel", "population_kernel", "PopulationProvider", "PopulationLoop", "PopulationTelemetry",
        "mlflow_population",
    ),
    "researchlab.tracking.utils": (
        "GitStateWarning", "GitState", "patch_bytes", "strip_url_credentials", "SECRET_PATTERNS",
        "get_git_state", "find_run_by_rlab_id", "generate_run_id", "log_flattened_params", "clean_notebook",
    ),
    "researchlab.tracking.tracker": (
        "project_root", "resolve_tracking_uri", "find_notebook_path", "ExperimentTracker",
        "EXECUTED_CELLS", "GIT_PATCH", "executed_cells", "cells_notebook", "cells_script",
        "NotebookNotSavedWarning", "saved_notebook_problem",
    ),
    "researchlab.tracking.magic": (
        "RlabMagics", "load_ipython_extension", "run_banner",
    ),
    "researchlab.tracking.compare": (
        "find_runs", "run_histories", "default_groups", "group_stats", "plot_runs",
    ),
    "researchlab.tracking.fork": (
        "FORK_TAGS", "lineage_tags", "checkpoint_at_or_before", "structure_difference",
        "step_structure_difference", "ForkTelemetry", "child_mlflow_telemetry", "fork",
    ),
    "researchlab.tracking.run": (
        "DEFAULT_TRACKING_URI", "DEFAULT_RUNS_DIR", "DEFAULT_EXPERIMENT", "ENV_PACKAGES", "ARTIFACT_DIR",
        "CHECKPOINT_SLOTS", "LOG_CHECKPOINT_EVERY_S", "CLIError", "validation_problems", "override_values",
        "parse_overrides", "Experiment", "load_target", "build_experiment", "environment_info",
        "environment_tags", "LoggingPersister", "fetch_logged_checkpoint", "logged_checkpoint_steps",
        "RunLocked", "RunLock", "AlreadyFinished", "RunOptions", "RunPlan", "resume_command", "plan_run",
        "RunProgress", "execute_plan", "run_target", "options_help", "run_help", "parse_run_args",
        "summary_lines", "handle_run", "run_main",
    ),
    "researchlab.tracking.reproduce": (
        "REPRODUCES_TAG", "ReproduceError", "find_run_by_id", "RunRecipe", "run_recipe", "run_checkout",
        "MetricDifference", "first_metric_difference", "EnvironmentDifference", "environment_differences",
        "ReproduceReport", "compare_runs", "rerun_command", "reproduce", "reproduce_main",
    ),
    "researchlab.tracking.sweep": (
        "Grid", "SWEEP_ARTIFACT", "TRIAL_TAG", "EXECUTORS", "SWEEP_USAGE", "SweepError", "Distribution", "parse_grid",
        "expand_grid", "value_text", "trial_key", "Trial", "make_trials", "trial_command", "grid_args", "sweep",
        "PopulationGroup", "population_plan", "parse_sweep_args", "sweep_main",
    ),
    "researchlab.rl.advantages": (
        "Scale", "compute_ppo_advantages", "compute_grpo_advantages", "normalize_advantages",
    ),
    "researchlab.rl.losses": (
        "LossAggregation", "aggregate_loss", "compute_ppo_loss", "compute_grpo_loss", "compute_dapo_loss",
        "token_logprobs_and_entropy", "sequence_logprobs", "compute_dpo_loss",
    ),
    "researchlab.rl.kl": (
        "KLFn", "KLEstimator", "KLReduction", "compute_per_token_kl", "compute_reverse_kl",
        "compute_forward_kl", "create_truncated_kl", "create_adaptive_kl", "compute_batch_kl",
        "update_kl_coef",
    ),
    "researchlab.rl.rewards": (
        "ShapingFn", "aggregate_vector_rewards", "normalize_rewards", "apply_reward_shaping",
        "compute_overlong_punishment", "create_overlong_shaping", "compute_dynamic_sampling_mask",
    ),
    "researchlab.rl.reference": (
        "RefUpdateFn", "create_reference_model", "create_ema_updater", "create_periodic_updater",
    ),
    "researchlab.rl.algorithms": (
        "ALGORITHM_PRESETS", "LossBatch", "AlgorithmLossFn", "LOSS_FNS", "AlgorithmConfig",
        "create_algorithm_config", "compute_loss_by_algorithm", "compute_advantages_by_algorithm",
        "AlgorithmSchedule",
    ),
    # researchlab.llm: chat types, tokenizers, chat templates, the Llama decoder, sampling, LoRA
    "researchlab.llm.types": (
        "ROLES", "Role", "FINISH_REASONS", "ToolCall", "Message", "Conversation", "check_conversation",
        "GenerationConfig", "Generation", "finish_reasons", "ModelConfig",
    ),
    "researchlab.llm.tokenizers": (
        "CHATML_SPECIAL_TOKENS", "SMOLLM2_FILE", "Tokenizer", "HFTokenizer", "train_bpe", "gguf_metadata",
        "tokenizer_from_gguf", "smollm2_path", "load_tokenizer",
    ),
    "researchlab.llm.chat": (
        "CHATML_TEMPLATE", "HERMES_TOOLS_PREAMBLE", "HERMES_TOOLS_FOOTER", "HERMES_TEMPLATE", "MASK_ON", "MASK_OFF",
        "Segments", "TemplateFn", "render_segments", "render_chat", "ChatTokens", "apply_chat_template",
        "parse_tool_calls", "check_prefix_preserving",
    ),
    "researchlab.llm.models": (
        "LlamaLayers", "Llama", "init_llama", "tiny_llama", "rms_norm", "apply_rope", "grouped_query_attention", "KVCache",
        "init_cache", "llama_forward", "sequence_logits", "llama_from_gguf", "load_model",
    ),
    "researchlab.llm.generate": (
        "left_pad", "filter_logits", "restrict_logits", "sample_token", "kv_generate", "recompute_generate", "completion_logprobs",
        "Generator", "KVCacheGenerator", "RecomputeGenerator", "OpenAICompatibleGenerator", "decode_completions",
        "batch_generate", "generate", "Completion", "to_completions", "generate_with_logprobs",
    ),
    "researchlab.llm.lora": (
        "LoraConfig", "LoraWeight", "linear_weight_paths", "lora_init", "lora_merge", "lora_filter", "lora_partition",
    ),
    # researchlab.llm, part 2: tools, rollouts as data, environments, rewards over rollouts
    "researchlab.llm.tools": (
        "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE", "TOOL_ERRORS", "ToolTable", "ToolCallError", "extract_tool_calls",
        "tool_schema", "ToolResult", "tool_message", "tool_table", "execute_tools", "ToolStats", "track_tool_calls",
        "execute_and_track_tools", "tool_metrics",
    ),
    "researchlab.llm.rollouts": (
        "STOP_REASONS", "AdvantageFn", "Rollout", "RolloutGroup", "Renderer", "stop_tokens", "render_prompt",
        "render_observation", "Policy", "Observation", "StepResult", "Env", "EnvGroupBuilder", "run_sync", "run_envs",
        "decode_action", "as_conversation", "SingleTurnEnv", "as_rewards_K", "score_rollouts", "rollout_logprobs",
        "finish_rollouts", "create_rollout", "create_batch_rollouts", "RolloutBatch", "batch_from_rollouts",
    ),
    "researchlab.llm.envs": (
        "StopCondition", "ToolParser", "ToolExecutor", "TurnRewardFn", "ToolEnv", "EnvGroup", "rollout_groups",
        "create_multiturn_rollout", "ScriptedGenerator",
    ),
    "researchlab.llm.rewards": (
        "RewardFn", "BatchRewardFn", "compute_vector_reward", "compute_scalar_reward", "compute_batch_rewards",
        "combine_rewards", "final_text", "last_number", "normalize_answer", "exact_match_reward", "numeric_match_reward", "format_reward",
        "tool_use_reward", "length_reward", "Scorer", "RewardModel", "reward_model_from", "init_reward_model",
        "reward_model_scores", "bradley_terry_loss", "save_reward_model", "load_reward_model",
        "compute_reward_model_score",
    ),
    # researchlab.llm.train: post-training on the Loop (training_step, training_iteration, train)
    "researchlab.llm.train": (
        "ISCorrection", "LossFn", "PromptLoader", "SampleFn", "EvalFn", "TrainConfig", "algorithm_schedule",
        "TrainState", "split_model", "make_optimizer", "init_train_state", "split_micro_batches", "merge_micro_batches",
        "token_logprobs", "get_reference_logprobs",
        "importance_weights", "algorithm_loss", "training_step", "TrainFns", "IterationBatch", "update_iteration",
        "UpdateFn", "make_update_fn", "jit_update_fn", "Problem", "load_problems", "env_group", "sample_groups", "rollout_stats",
        "RolloutProvider", "training_iteration", "train", "quick_start_training",
    ),
    "researchlab.llm.view": (
        "ROLLOUTS_DIR", "advantage_color", "RolloutView", "view_rollout", "group_advantages", "view_group",
        "rollouts_table", "rollout_record", "rollout_from_record", "rollouts_artifact", "log_rollouts",
        "logged_rollout_steps", "load_rollouts",
    ),
}
_LAZY: dict[str, str] = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBPACKAGES = ("design", "tracking", "rl", "llm", "examples")

__all__ = list(_LAZY)


def __getattr__(name: str) -> object:
    "Import the module that defines `name` on first use (PEP 562), then keep the value here."
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))

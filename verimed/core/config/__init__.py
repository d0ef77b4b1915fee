"""The one typed config tree of a verimed run (schemas only; the bottom of ``verimed.core``).

    from verimed.core.config import load_config
    cfg = load_config("configs/default.yaml", ["grpo.eps_high=0.3", "run.steps=4"])

Modules: ``base`` (ConfigError, Section, number types), ``stages`` and
``placement`` (their sections' schemas and checks), ``schema`` (the tree and its
defaults), ``loading`` (YAML, dotted overrides, one-line errors).
May import: msgspec and yaml only — never another ``verimed`` package, torch or ray.
Inside the package, modules import each other by full module path, never
through this ``__init__``.
"""
from verimed.core.config.base import ConfigError
from verimed.core.config.loading import apply_override, from_dict, load_config, to_dict, to_yaml
from verimed.core.config.placement import PlacementConfig, RoleSpec
from verimed.core.config.schema import (AsyncConfig, Config, DataConfig, EmulationConfig, GRPOConfig, JudgeConfig, LLMConfig,
                                        MetricsConfig, ModelConfig, RolloutConfig, RubricConfig, RunConfig,
                                        SimulatorConfig, TrainerConfig, WeightSyncConfig)
from verimed.core.config.stages import (DataMix, RewardConfig, StageConfig, StageError, StageEvalConfig,
                                        effective_config, reference_needed, total_steps, validate_stages)

__all__ = [
    "ConfigError", "apply_override", "from_dict", "load_config", "to_dict", "to_yaml", "PlacementConfig", "RoleSpec",
    "AsyncConfig", "Config", "DataConfig", "EmulationConfig", "GRPOConfig", "JudgeConfig", "LLMConfig", "MetricsConfig", "ModelConfig",
    "RolloutConfig", "RubricConfig", "RunConfig", "SimulatorConfig", "TrainerConfig", "WeightSyncConfig",
    "DataMix", "RewardConfig", "StageConfig", "StageError", "StageEvalConfig", "effective_config",
    "reference_needed", "total_steps", "validate_stages",
]

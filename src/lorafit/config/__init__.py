"""The run config: the typed, frozen schema (``schema``), the strict file loader (``loader``) and the generated
key reference (``reference``). Bottom layer: uses only ``lorafit.errors``; every other package may use it."""

from lorafit.config.loader import apply_overrides, default_config_path, load_config, validate_config
from lorafit.config.model_sections import BUILTIN_TINY_MODEL, BUILTIN_TINY_MODELS
from lorafit.config.schema import (
    EVAL_LOG_METRICS,
    GENERATION_METRICS,
    LOSS_METRICS,
    LOWER_IS_BETTER,
    TRAIN_LOG_METRICS,
    ArtifactConfig,
    BestConfig,
    Config,
    DataConfig,
    DataSource,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    TrackingConfig,
    TrainConfig,
    warmup_steps_for,
)
from lorafit.config.distributed import DistributedConfig
from lorafit.config.objective import AttackEvalConfig, DebugConfig, ObjectiveConfig, PluginsConfig
from lorafit.config.reference import schema_reference

__all__ = [
    "AttackEvalConfig", "DebugConfig", "DistributedConfig", "ObjectiveConfig", "PluginsConfig",
    "BUILTIN_TINY_MODEL", "BUILTIN_TINY_MODELS", "EVAL_LOG_METRICS", "GENERATION_METRICS", "LOSS_METRICS", "LOWER_IS_BETTER",
    "TRAIN_LOG_METRICS", "ArtifactConfig", "BestConfig", "Config", "DataConfig", "DataSource", "EvalConfig",
    "LoraConfig", "ModelConfig", "QuantConfig", "TrackingConfig", "TrainConfig", "apply_overrides",
    "default_config_path", "load_config", "schema_reference", "validate_config", "warmup_steps_for",
]

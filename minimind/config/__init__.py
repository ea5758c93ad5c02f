"""Typed configuration read by every other part of minimind."""

from minimind.config.loading import (
    apply_overrides,
    build_config,
    build_model_config,
    config_to_dict,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    load_yaml_document,
    parse_override_args,
    yaml_child,
    yaml_error_message,
    yaml_key_lines,
)
from minimind.config.presets import PRESETS, preset_fields
from minimind.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    MixtureSource,
    ModelConfig,
    MoEConfig,
    ObjectiveConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)


def model_config(preset: str, **overrides) -> ModelConfig:
    """A validated :class:`ModelConfig` for ``preset`` with field overrides."""
    return build_model_config({"preset": preset, **overrides})


__all__ = [
    "PRESETS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "MixtureSource",
    "ModelConfig",
    "MoEConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RuntimeConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "build_model_config",
    "config_to_dict",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_yaml",
    "load_yaml_document",
    "model_config",
    "parse_override_args",
    "preset_fields",
    "yaml_child",
    "yaml_error_message",
    "yaml_key_lines",
]

"""Configuration: the schema (`schema.py`, the dataclasses Hydra composes into) and the start-up rules
(`rules.py`)."""

from omegaconf import MISSING

from .rules import validate, validate_model
from .schema import (
    CONFIG_DIR,
    YARN_KEYS,
    BalanceConfig,
    ConfigError,
    DataConfig,
    DeepSpeedSection,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
    WandbConfig,
    load_config,
    register_configs,
    resolved_dict,
    to_object,
)

__all__ = [
    "MISSING",
    "CONFIG_DIR",
    "YARN_KEYS",
    "DeepSpeedSection",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "BalanceConfig",
    "TrainerConfig",
    "LoggerConfig",
    "WandbConfig",
    "ParallelConfig",
    "TrainConfig",
    "register_configs",
    "load_config",
    "to_object",
    "validate",
    "validate_model",
    "resolved_dict",
]

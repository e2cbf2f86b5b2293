"""Training entry points: `main(cfg)` for Hydra's train.py and tests."""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig

from ..config import ConfigError, TrainConfig, to_object, validate


class UserError(SystemExit):
    """Raised for problems the user can fix; carries exit status 2 and prints no traceback."""


def run_dir_of(cfg: TrainConfig) -> str:
    """cfg.run_dir, else Hydra's run dir when under Hydra, else the working directory."""
    if cfg.run_dir:
        return cfg.run_dir
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().runtime.output_dir
    except ImportError:
        pass
    return os.getcwd()


def main(cfg: DictConfig | TrainConfig) -> dict[str, Any]:
    """Validate, build, train; returns the run summary. Bad input exits with status 2 and one message."""
    from .trainer import NonFiniteLossError, Trainer

    try:
        obj = to_object(cfg)
        validate(obj, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        trainer = Trainer(obj, run_dir_of(obj))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        return trainer.run()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


__all__ = ["main", "run_dir_of"]

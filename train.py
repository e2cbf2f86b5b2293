"""Hydra entry point: `python train.py key=value ...` (see docs/configuration.md)."""

import hydra
from omegaconf import DictConfig

from moe_train.config import register_configs

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base=None)
def run(cfg: DictConfig) -> None:
    from moe_train.train import main

    main(cfg)


if __name__ == "__main__":
    run()

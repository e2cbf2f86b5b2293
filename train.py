"""Hydra entry point: `python train.py key=value ...` (see docs/configuration.md, docs/launching.md)."""

import os
import sys

import hydra
from omegaconf import DictConfig

from moe_train.config import register_configs
from moe_train.train.hydra_args import rank_overrides

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base=None)
def run(cfg: DictConfig) -> None:
    from moe_train.train import main

    main(cfg)


if __name__ == "__main__":
    # before Hydra parses argv: one run dir per launch, `.hydra/` written by rank 0 only
    sys.argv += rank_overrides(sys.argv[1:], os.environ)
    run()

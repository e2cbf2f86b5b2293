"""Hydra entry point: `python train.py key=value ...` (see docs/configuration.md, docs/launching.md)."""

import os
import sys

import hydra
from omegaconf import DictConfig

from moe_train.config import register_configs
from moe_train.train.faults import EXIT_USER_ERROR
from moe_train.train.hydra_args import HYDRA_RECORD_ENV, hydra_record_dir, rank_overrides

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base=None)
def run(cfg: DictConfig) -> None:
    from moe_train.train import main

    main(cfg)


if __name__ == "__main__":
    # before Hydra parses argv: one run dir per launch; `.hydra/` written by rank 0 once the run dir is its
    record = hydra_record_dir(sys.argv[1:], os.environ)
    if record:
        os.environ[HYDRA_RECORD_ENV] = record
    sys.argv += rank_overrides(sys.argv[1:], os.environ)
    try:
        run()
    except SystemExit as e:
        # Hydra reports its own errors (an unknown key, a malformed override, a missing group) with status 1,
        # the status Python gives a crash; they are bad input, which exits 2 (docs/launching.md). Hydra sets
        # its HydraConfig only once the config is composed and the task is about to run.
        from hydra.core.hydra_config import HydraConfig

        if e.code == 1 and not HydraConfig.initialized():
            raise SystemExit(EXIT_USER_ERROR) from None
        raise

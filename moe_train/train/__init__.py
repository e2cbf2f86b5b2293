"""Training entry points: `main(cfg)` for Hydra's train.py and tests."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig

from ..config import ConfigError, TrainConfig, to_object, validate
from ..parallel.layout import check_layout
from ..parallel.mesh import Mesh, build_mesh


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


def shared_run_dir(run_dir: str, mesh: Mesh) -> str:
    """Rank 0's run dir for every rank (each rank's Hydra may have stamped its own time)."""
    if not mesh.distributed:
        return run_dir
    box = [run_dir]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main(cfg: DictConfig | TrainConfig) -> dict[str, Any]:
    """Validate, build, train; returns the run summary. Bad input exits with status 2 and one message."""
    from ..checkpoint import CheckpointError
    from .faults import (
        EXIT_COLLECTIVE,
        EXIT_EVAL,
        EXIT_NONFINITE,
        EXIT_PREEMPTED,
        CollectiveError,
        EvaluationError,
        Preempted,
    )
    from .trainer import NonFiniteLossError, Trainer

    try:
        obj = to_object(cfg)
        validate(obj)
        check_layout(obj, int(os.environ.get("WORLD_SIZE", "1")))
        p = obj.parallel
        mesh = build_mesh(p.pp, p.ep, p.gpus_per_node, obj.trainer.device, p.backend, p.timeout_s)
        trainer = Trainer(obj, shared_run_dir(run_dir_of(obj), mesh), mesh)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        return trainer.run()
    except CheckpointError as e:  # a commit that did not verify, or a lost writer lease
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE) from None
    except EvaluationError as e:
        print(f"error: rank {mesh.rank}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_EVAL) from None
    except Preempted as e:
        if mesh.is_logging_rank:
            print(f"preempted: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
    except CollectiveError as e:
        # every rank prints: the rank that reports first is usually not the one that caused the hang
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_COLLECTIVE) from None


__all__ = ["main", "run_dir_of"]

"""Training entry points: `main(cfg)` for Hydra's train.py and tests."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig

from ..config import ConfigError, TrainConfig, to_object, validate
from ..data.mixture import mixture_sources
from ..parallel.layout import check_layout
from ..parallel.mesh import Mesh, build_mesh
from .hydra_args import write_hydra_record


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
    from .faults import guarded

    box = [run_dir]
    with guarded(mesh, "broadcast of the run dir"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _exit_status(e: BaseException, built: bool) -> int | None:
    """The documented status for an exception that ends a run; None for an unexpected one (a bug: Python
    prints its traceback and exits 1)."""
    from ..checkpoint import CheckpointError
    from .faults import (
        EXIT_COLLECTIVE,
        EXIT_EVAL,
        EXIT_NONFINITE,
        EXIT_PREEMPTED,
        EXIT_USER_ERROR,
        CollectiveError,
        EvaluationError,
        NonFiniteLossError,
        Preempted,
    )

    if not built and isinstance(e, ConfigError | FileNotFoundError | ValueError):
        return EXIT_USER_ERROR
    for kind, status in (
        (CheckpointError, EXIT_USER_ERROR),  # unwritable, damaged, unverified, a lost writer lease, disk full
        (NonFiniteLossError, EXIT_NONFINITE),
        (EvaluationError, EXIT_EVAL),
        (Preempted, EXIT_PREEMPTED),
        (CollectiveError, EXIT_COLLECTIVE),
    ):
        if isinstance(e, kind):
            return status
    return None


def main(cfg: DictConfig | TrainConfig) -> dict[str, Any]:
    """Validate, build, train; returns the run summary. Every other ending prints one message and exits with
    its documented status (train/faults.py). Whatever the ending, the process groups are destroyed first, in
    one order (Mesh.close), and rank 0 records the status for the launch scripts (faults.record_status)."""
    from .faults import EXIT_EVAL, EXIT_OK, EXIT_PREEMPTED, record_status, stop_elastic_agent
    from .trainer import Trainer

    record_status(None)
    mesh: Mesh | None = None
    built = False
    try:
        obj = to_object(cfg)
        validate(obj)
        mixture_sources(obj.data)  # its rules live with the mixture (config.py knows nothing of data/)
        check_layout(obj, int(os.environ.get("WORLD_SIZE", "1")))
        p = obj.parallel
        mesh = build_mesh(p.pp, p.ep, p.gpus_per_node, obj.trainer.device, p.backend, p.timeout_s)
        trainer = Trainer(obj, shared_run_dir(run_dir_of(obj), mesh), mesh)
        built = True
        if mesh.is_logging_rank:  # the run dir is this run's now (its writer lease)
            write_hydra_record(trainer.run_dir, cfg)
        summary = trainer.run()
    except BaseException as e:
        status = _exit_status(e, built)
        if mesh is not None:
            mesh.close()
        if status is None:
            raise
        if status == EXIT_EVAL and mesh is not None:
            print(f"error: rank {mesh.rank}: {e}", file=sys.stderr, flush=True)
        elif status != EXIT_PREEMPTED:
            # every rank prints: with a failed collective the rank reporting first is seldom the cause
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif mesh is None or mesh.is_logging_rank:
            print(f"preempted: {e}", file=sys.stderr, flush=True)
        record_status(status)
        if status == EXIT_PREEMPTED:
            stop_elastic_agent()
        raise SystemExit(status) from None
    mesh.close()
    record_status(EXIT_OK)
    return summary


__all__ = ["main", "run_dir_of"]

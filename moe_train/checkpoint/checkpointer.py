"""A run's checkpoints as the trainer uses them: resume from one, save the next, commit what is in flight.

Holds the checkpoints directory, the asynchronous save still being written (committed at the next save or
at the end of the run) and the gloo group those background writes coordinate on — their own, so they never
race the training collectives on the main group (NCCL on GPUs).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..parallel.mesh import Mesh
from .directory import latest_checkpoint, resolve_checkpoint
from .errors import checkpoint_io
from .sharded import PendingSave, commit_pending
from .trainer_state import NamedOptimizerState, load, save


class Checkpointer:
    def __init__(self, cfg: TrainConfig, run_dir: str, mesh: Mesh) -> None:
        self.cfg, self.mesh = cfg, mesh
        self.root = os.path.join(run_dir, "checkpoints")
        self._pending: PendingSave | None = None
        self._async_group = None
        if cfg.trainer.async_save and mesh.distributed:
            self._async_group = dist.new_group(backend="gloo")

    def to_resume(self) -> str | None:
        """The checkpoint `trainer.resume` names: the latest of this run (auto), a path, or none."""
        mode = self.cfg.trainer.resume
        if mode == "none":
            return None
        return latest_checkpoint(self.root) if mode == "auto" else resolve_checkpoint(mode)

    def load(
        self,
        path: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sharded: NamedOptimizerState | None,
    ) -> dict[str, Any]:
        """Weights, optimizer state and RNG from `path` (any layout's); returns the trainer's state."""
        with checkpoint_io(f"loading checkpoint {path}", path):
            return load(path, model, optimizer, sharded, self.mesh, self.cfg.model)

    def save(
        self,
        trainer_state: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sharded: NamedOptimizerState | None,
        config_yaml: str,
    ) -> str | None:
        """Every rank writes its own shards; committed atomically once all ranks are done (None while an
        asynchronous write is still in flight)."""
        t = self.cfg.trainer
        self.finish()
        with checkpoint_io(f"saving the checkpoint of step {trainer_state['step']}", self.root):
            out = save(
                self.root,
                trainer_state,
                model,
                optimizer,
                sharded,
                self.mesh,
                config_yaml,
                t.keep_last,
                t.async_save,
                self._async_group,
            )
        if isinstance(out, PendingSave):
            self._pending = out
            return None
        return out

    def finish(self) -> str | None:
        """Commit an asynchronous save still in flight (collective); None if there is none."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        with checkpoint_io(f"committing the checkpoint of step {pending.step}", self.root):
            return commit_pending(pending, self.cfg.trainer.keep_last)

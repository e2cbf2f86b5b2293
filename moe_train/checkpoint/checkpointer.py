"""A run's checkpoints as the trainer uses them: hold the run dir, resume from one, save the next, commit what
is in flight.

Built before any other work of the run: rank 0 checks that the checkpoints directory is writable and takes
the run dir's writer lease (lease.py), and every rank stops with the same CheckpointError if either fails.
Resuming verifies the checkpoint's files (integrity.py): `trainer.resume=auto` falls back, newest commit
first, to the first that verifies and says which it skipped; an explicit path that does not verify is an
error. The checkpoints that cannot be ancestors of the one resumed then move to superseded/ (directory.py).

Holds the asynchronous save still being written (committed at the next save or at the end of the run) and
the gloo group those background writes coordinate on — their own, so they never race the training
collectives on the main group (NCCL on GPUs).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..parallel.mesh import Mesh
from ..train.hydra_args import launch_id
from .directory import (
    CheckpointError,
    check_writable,
    newest_first,
    recover,
    resolve_checkpoint,
    supersede,
)
from .errors import checkpoint_io
from .integrity import verify
from .lease import RunLease
from .sharded import PendingSave, commit_pending
from .trainer_state import NamedOptimizerState, load, save


class Checkpointer:
    def __init__(self, cfg: TrainConfig, run_dir: str, mesh: Mesh) -> None:
        self.cfg, self.mesh = cfg, mesh
        self.root = os.path.join(run_dir, "checkpoints")
        self._pending: PendingSave | None = None
        self.lease: RunLease | None = None
        problem = None
        if mesh.rank == 0:
            try:
                check_writable(self.root)
                self.lease = RunLease(run_dir, launch_id(os.environ), cfg.trainer.lease_timeout_s)
                self.lease.acquire()
                recover(self.root)
            except CheckpointError as e:
                problem = str(e)
        self._agree(problem)
        self._async_group = None
        if cfg.trainer.async_save and mesh.distributed:
            self._async_group = dist.new_group(backend="gloo")

    def _agree(self, problem: str | None) -> None:
        """Raise rank 0's `problem` on every rank (collective), so no rank goes on alone."""
        box = [problem]
        if self.mesh.distributed:
            dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise CheckpointError(box[0])

    def _say(self, msg: str) -> None:
        if self.mesh.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def to_resume(self) -> str | None:
        """The checkpoint `trainer.resume` names, verified: the newest of this run that verifies (auto), a
        path, or none; then the checkpoints that cannot be its ancestors move to superseded/. Collective."""
        mode = self.cfg.trainer.resume
        path = None
        if mode == "auto":
            path = self._newest_verified()
        elif mode != "none":
            path = resolve_checkpoint(mode)
            problem = verify(path)
            if problem:
                raise CheckpointError(f"checkpoint {path} does not verify: {problem}")
        moved = None
        if self.mesh.rank == 0 and self.lease is not None:
            moved = supersede(self.root, path)
        if self.mesh.distributed:
            dist.barrier()
        if moved:
            line, names = path or "a fresh start", ", ".join(moved)
            self._say(f"checkpoints not on the line of {line} moved aside: {self.root}/{{{names}}}")
        return path

    def _newest_verified(self) -> str | None:
        skipped = []
        for path in newest_first(self.root):
            problem = verify(path)
            if problem is None:
                return path
            skipped.append(f"{os.path.basename(path)} ({problem})")
            self._say(f"warning: resume=auto skips {path}: {problem}")
        if skipped:
            raise CheckpointError(
                f"no checkpoint in {self.root} verifies: {'; '.join(skipped)}; "
                "pass trainer.resume=none to start afresh (they would move to superseded/)"
            )
        return None

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

    def _check_lease(self) -> None:
        """A run that lost its lease (another run took the dir over) must not commit. Collective."""
        problem = None
        if self.mesh.rank == 0 and self.lease is not None and not self.lease.held():
            problem = f"writer lease {self.lease.path} was taken over by another run; not committing"
        self._agree(problem)

    def save(
        self,
        trainer_state: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sharded: NamedOptimizerState | None,
        config_yaml: str,
    ) -> str | None:
        """Every rank writes its own shards; committed once all ranks are done and every file read back
        (None while an asynchronous write is still in flight)."""
        t = self.cfg.trainer
        self.finish()
        self._check_lease()
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
        self._check_lease()
        with checkpoint_io(f"committing the checkpoint of step {pending.meta['step']}", self.root):
            return commit_pending(pending, self.cfg.trainer.keep_last)

    def close(self) -> None:
        """Give up the run dir's writer lease (the run writes nothing more)."""
        if self.lease is not None:
            self.lease.release()

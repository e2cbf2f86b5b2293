"""Checkpoints: the trainer's sharded checkpoints, the whole-model format, and the directories both live in.

  Checkpointer                 a run's checkpoints for the trainer: writer lease, resume (verified, with
                               fallback), save (sync or async), verified commit
  CheckpointError              a checkpoint that cannot be written or read as asked (one line, exit 2)
  RunLease                     one writer per run directory: a lease file with a heartbeat
  verify                       a checkpoint's files against the checksums recorded at commit
  save, load, commit_pending   the trainer's state as a sharded checkpoint (any layout reads any other's);
                               `load` reads the whole-model format too
  latest_checkpoint            the newest complete checkpoint of a checkpoints directory
  resolve_checkpoint           the checkpoint a step dir, a checkpoints dir or a run dir names
  load_model_state             the one-process model state dict of a checkpoint of either format (HF export,
                               inference)
  save_checkpoint, load_checkpoint   the whole-model format (HF imports)
  full_state, full_gradients   whole-model state and gradients gathered across ep and pp

Modules: checkpointer.py (the trainer's view), lease.py (the writer lease), integrity.py (checksums,
read-back), directory.py (naming, meta.json, atomic commit, `latest`, history, pruning), sharded.py (the DCP
format: per-rank shards, layout-independent keys), whole.py (the whole-model format; whole state across ep
and pp), trainer_state.py (what a checkpoint holds for the trainer), errors.py (I/O failures — a full disk,
a damaged file, DCP's CheckpointException — as a CheckpointError naming the path), mismatch.py (the error for
a checkpoint that does not fit the model).
"""

from __future__ import annotations

from .checkpointer import Checkpointer
from .directory import CheckpointError, latest_checkpoint, resolve_checkpoint
from .integrity import verify
from .lease import RunLease
from .sharded import PendingSave, commit_pending
from .trainer_state import load, save
from .whole import full_gradients, full_state, load_checkpoint, load_model_state, save_checkpoint

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "PendingSave",
    "commit_pending",
    "full_gradients",
    "full_state",
    "latest_checkpoint",
    "load",
    "load_checkpoint",
    "load_model_state",
    "resolve_checkpoint",
    "RunLease",
    "save",
    "save_checkpoint",
    "verify",
]

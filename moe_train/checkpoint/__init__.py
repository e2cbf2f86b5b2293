"""Checkpoints: the trainer's sharded checkpoints, the whole-model format, and the directories both live in.

  Checkpointer                 a run's checkpoints for the trainer: resume, save (sync or async), commit
  save, load, commit_pending   the trainer's state as a sharded checkpoint (any layout reads any other's);
                               `load` reads the whole-model format too
  CheckpointIOError            a checkpoint could not be written or read (the message names the path)
  latest_checkpoint            the newest complete checkpoint of a checkpoints directory
  resolve_checkpoint           the checkpoint a step dir, a checkpoints dir or a run dir names
  load_model_state             the one-process model state dict of a checkpoint of either format (HF export,
                               inference)
  save_checkpoint, load_checkpoint   the whole-model format (HF imports)
  full_state, full_gradients   whole-model state and gradients gathered across ep and pp

Modules: checkpointer.py (the trainer's view),
directory.py (naming, meta.json, atomic commit, `latest`, pruning), sharded.py (the DCP format:
per-rank shards, layout-independent keys), whole.py (the whole-model format; whole state across ep and pp),
trainer_state.py (what a checkpoint holds for the trainer), errors.py (I/O failures as one line naming the
path), mismatch.py (the error for a checkpoint that does
not fit the model).
"""

from __future__ import annotations

from .checkpointer import Checkpointer
from .directory import latest_checkpoint, resolve_checkpoint
from .errors import CheckpointIOError
from .sharded import PendingSave, commit_pending
from .trainer_state import load, save
from .whole import full_gradients, full_state, load_checkpoint, load_model_state, save_checkpoint

__all__ = [
    "CheckpointIOError",
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
    "save",
    "save_checkpoint",
]

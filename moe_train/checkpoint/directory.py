"""Checkpoint directories under <run dir>/checkpoints/, whatever the format inside: naming, `meta.json`,
the atomic commit, `latest`, pruning and finding the checkpoint a path names.

  checkpoints/
    latest             one line: the newest committed step_N (replaced atomically)
    step_00000100/     one checkpoint; complete once it holds meta.json

A checkpoint is written into a temporary `step_N.tmp*` directory; `seal` writes the files every format has
(trainer.pt, config.yaml, and meta.json last), `publish` renames the directory into place and then replaces
`latest`. A crash at any point leaves the previous checkpoint complete and `latest` naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import torch

from .errors import CheckpointIOError

_STEP_RE = re.compile(r"^step_(\d+)$")


def _atomic_write_text(path: str, text: str) -> None:
    """Readers see the old file or the new one, never a partial one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def read_meta(path: str) -> dict[str, Any] | None:
    """A checkpoint's meta.json, or None when the directory holds no complete checkpoint."""
    meta = os.path.join(path, "meta.json")
    if not os.path.isfile(meta):
        return None
    with open(meta, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointIOError(f"{meta} is not valid JSON ({e}); the checkpoint is damaged") from None


def seal(
    tmp: str,
    step: int,
    trainer_state: dict[str, Any],
    config_yaml: str,
    fmt: str,
    has_optim: bool,
    layout: dict[str, int] | None = None,
) -> None:
    """Write trainer.pt, config.yaml and, last, meta.json into the temporary directory `tmp`."""
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml)
    meta: dict[str, Any] = {
        "step": step,
        "format": fmt,
        "time": time.time(),
        "has_optim": has_optim,
    }
    if layout is not None:
        meta["layout"] = layout
    _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta))


def publish(tmp: str, final: str, keep_last: int | None) -> None:
    """Rename the sealed `tmp` to `final`, point `latest` at it, keep the newest `keep_last` checkpoints."""
    if os.path.exists(final):  # re-saving a step (after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    root = os.path.dirname(final)
    _atomic_write_text(os.path.join(root, "latest"), os.path.basename(final) + "\n")
    if keep_last:
        prune(root, keep_last)


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """Complete checkpoints (with meta.json), oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = _STEP_RE.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def prune(ckpt_root: str, keep_last: int) -> None:
    for _, path in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The checkpoint `latest` names if complete, else the newest complete one, else None."""
    pointer = os.path.join(ckpt_root, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(ckpt_root, f.read().strip())
        if os.path.isfile(os.path.join(path, "meta.json")):
            return path
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a directory of checkpoints (its latest), or a run dir (its latest)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        found = latest_checkpoint(root)
        if found:
            return found
    raise FileNotFoundError(
        f"no complete checkpoint at {path!r}: expected a step_N directory with meta.json, "
        "a checkpoints directory, or a run directory that has one"
    )

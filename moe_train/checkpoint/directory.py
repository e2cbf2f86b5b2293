"""Checkpoint directories under <run dir>/checkpoints/, whatever the format inside: naming, `meta.json`,
the commit, `latest`, the commit history, pruning and finding the checkpoint a path names.

  checkpoints/
    latest             one line: the newest committed step_N (replaced atomically)
    step_00000100/     one checkpoint; committed once it holds meta.json
    superseded/        checkpoints of abandoned branches, moved aside (never deleted by a run)

A checkpoint is written into a temporary `step_N.tmp*` directory; `write_common` writes the files every format
has (trainer.pt, config.yaml), the caller reads every file back (integrity.py), `write_meta` writes meta.json
with their checksums, and `publish` renames the directory into place and then replaces `latest`. A crash at
any point leaves the previous checkpoint complete and `latest` naming it.

History, not step numbers. meta.json's `commit` is one more than the highest commit number in the directory,
so the order of commits survives resuming from an earlier step. Pruning keeps the newest `keep_last` commits
and `resume=auto` tries them newest first. When a run resumes at step S, the checkpoints that cannot be its
ancestors (later steps, later commits, or all of them when S comes from elsewhere) form a dead branch: they
move to superseded/ before training starts, so they are neither reused nor deleted.

Nothing is deleted before its replacement is committed: re-committing an existing step_N renames the old one
to `step_N.replaced` first and deletes it only after the new one is in place; `recover` (run by the writer at
start-up) puts a `.replaced` back whose replacement never arrived.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import torch

_STEP_RE = re.compile(r"^step_(\d+)$")
SUPERSEDED = "superseded"
REPLACED = ".replaced"


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read as asked; the message is one line naming the file.

    Not a RuntimeError, so `faults.guarded` does not take it for a failed collective."""


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
            raise CheckpointError(f"{meta} is not valid JSON ({e}); the checkpoint is damaged") from None


def check_writable(ckpt_root: str) -> None:
    """Create the checkpoints directory and write, sync and remove a probe file in it; CheckpointError if any
    of that fails — at start-up, so a read-only or missing mount stops the run before it trains."""
    probe = os.path.join(ckpt_root, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(ckpt_root, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("probe\n")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"checkpoints directory {ckpt_root} is not writable ({e.strerror or e}): "
            "fix its permissions or mount, or choose another run dir"
        ) from None


def write_common(tmp: str, trainer_state: dict[str, Any], config_yaml: str) -> None:
    """trainer.pt and config.yaml, the files every format has, into the temporary directory `tmp`."""
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml)


def write_meta(tmp: str, meta: dict[str, Any], files: dict[str, list[int]], checksum: str) -> None:
    """meta.json, last: `meta` (step, format, ...) plus the commit number, the time and every file's
    [size, checksum]. Its presence marks a committed checkpoint."""
    root = os.path.dirname(os.path.abspath(tmp))
    full = {**meta, "commit": next_commit(root), "time": time.time(), "checksum": checksum, "files": files}
    _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(full))


def commit_number(path: str) -> int:
    """The checkpoint's place in its directory's history; -1 when meta.json is unreadable or predates it."""
    try:
        return int((read_meta(path) or {}).get("commit", -1))
    except (OSError, ValueError, TypeError):
        return -1


def next_commit(ckpt_root: str) -> int:
    return max((commit_number(p) for _, p in list_checkpoints(ckpt_root)), default=0) + 1


def publish(tmp: str, final: str, keep_last: int | None) -> None:
    """Rename the sealed `tmp` to `final`, point `latest` at it, keep the newest `keep_last` commits."""
    root = os.path.dirname(final)
    aside = final + REPLACED
    replacing = os.path.exists(final)
    if replacing:  # re-committing a step: the old copy survives until the new one is in place
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(tmp, final)
    _atomic_write_text(os.path.join(root, "latest"), os.path.basename(final) + "\n")
    if replacing:
        shutil.rmtree(aside, ignore_errors=True)
    if keep_last:
        prune(root, keep_last)


def recover(ckpt_root: str) -> None:
    """Finish what a crash inside `publish` left: a `.replaced` copy whose replacement never arrived goes
    back into place; one whose replacement did is deleted. Only the lease holder calls this."""
    if not os.path.isdir(ckpt_root):
        return
    for name in os.listdir(ckpt_root):
        if not name.endswith(REPLACED):
            continue
        aside, final = os.path.join(ckpt_root, name), os.path.join(ckpt_root, name[: -len(REPLACED)])
        if os.path.isfile(os.path.join(final, "meta.json")):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(aside, final)


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """Committed checkpoints (with meta.json) as (step, path), oldest commit first."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = _STEP_RE.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            out.append((int(m.group(1)), path))
    return sorted(out, key=lambda sp: (commit_number(sp[1]), sp[0]))


def prune(ckpt_root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` commits (the newest is `latest`, so it is never deleted)."""
    for _, path in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def newest_first(ckpt_root: str) -> list[str]:
    """The order `resume=auto` tries: the checkpoint `latest` names, then the others, newest commit first."""
    ckpts = [p for _, p in reversed(list_checkpoints(ckpt_root))]
    pointed = _pointed(ckpt_root)
    if pointed in ckpts:
        ckpts.remove(pointed)
        ckpts.insert(0, pointed)
    return ckpts


def _pointed(ckpt_root: str) -> str | None:
    pointer = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        return os.path.join(ckpt_root, f.read().strip())


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The checkpoint `latest` names if complete, else the newest complete one, else None."""
    ckpts = newest_first(ckpt_root)
    return ckpts[0] if ckpts else None


def supersede(ckpt_root: str, resumed: str | None) -> list[str]:
    """Move the checkpoints that cannot be ancestors of `resumed` (None: a fresh start) to superseded/ and
    point `latest` at what remains; returns the moved names. Only the lease holder calls this."""
    ckpts = list_checkpoints(ckpt_root)
    m = _STEP_RE.match(os.path.basename(resumed)) if resumed is not None else None
    inside = m is not None and os.path.realpath(os.path.dirname(resumed)) == os.path.realpath(ckpt_root)
    if inside:
        base_step, base_commit = int(m.group(1)), commit_number(resumed)  # type: ignore[union-attr,arg-type]
        dead = [p for s, p in ckpts if s > base_step or commit_number(p) > base_commit]
    else:
        dead = [p for _, p in ckpts]
    moved = []
    for path in dead:
        aside = os.path.join(ckpt_root, SUPERSEDED, os.path.basename(path))
        n = 1
        while os.path.exists(aside):
            aside = os.path.join(ckpt_root, SUPERSEDED, f"{os.path.basename(path)}.{n}")
            n += 1
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.rename(path, aside)
        moved.append(os.path.relpath(aside, ckpt_root))
    remaining = list_checkpoints(ckpt_root)
    pointer = os.path.join(ckpt_root, "latest")
    if remaining:
        _atomic_write_text(pointer, os.path.basename(remaining[-1][1]) + "\n")
    elif os.path.exists(pointer):
        os.remove(pointer)
    return moved


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

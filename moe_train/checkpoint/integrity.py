"""Checksums of a checkpoint's files: taken when the files are read back before the commit, recorded in
meta.json, compared at load.

Each file is read once, by one rank: the sorted file list is dealt out round-robin over the ranks, each rank
reads its share, and one gather gives every rank the whole result — so every rank reaches the same verdict
and the cost is spread over the ranks' filesystem clients.

The checksum is CRC-32 (zlib, in the standard library) over the whole file, with the file's size. It guards
against accidents — truncated or lost files, a shard overwritten in place, a write that never reached the
disk — not against an adversary; CRC-32 detects every burst error up to 32 bits and misses a random
corruption with probability 2^-32, at about half the CPU time of SHA-256 (docs/checkpoints.md gives the
measured cost).
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import torch.distributed as dist

from .directory import read_meta

CHECKSUM = "crc32"
_CHUNK = 8 << 20


def file_checksum(path: str) -> list[int]:
    """[size in bytes, CRC-32] of one file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return [size, crc]


def _world(collective: bool) -> tuple[int, int]:
    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def read_back(
    path: str, min_sizes: dict[str, int], collective: bool = True
) -> tuple[dict[str, list[int]], list[str]]:
    """Read every file named in `min_sizes` (relative to `path`) once, on one rank: ({name: [size, crc]},
    problems such as "rng/rank1.pt: missing"), the same on every rank. `min_sizes[name]`: the size the file
    must reach at least (0: any). Collective unless `collective=False`."""
    rank, world = _world(collective)
    found: dict[str, list[int]] = {}
    problems: list[str] = []
    for name in sorted(min_sizes)[rank::world]:
        try:
            found[name] = file_checksum(os.path.join(path, name))
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as e:
            problems.append(f"{name}: unreadable ({e.strerror or e})")
            continue
        if found[name][0] < min_sizes[name]:
            problems.append(
                f"{name}: {found[name][0]} bytes, at least {min_sizes[name]} expected (truncated)"
            )
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (found, problems))
        found, problems = {}, []
        for f, p in parts:
            found.update(f)
            problems += p
    return found, sorted(problems)


def verify(path: str) -> str | None:
    """None when every file meta.json records is present with its size and checksum, else the first problem
    ("trainer.pt: checksum mismatch ..."). Checkpoints written before checksums existed pass unread.
    Collective."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"meta.json: unreadable ({e})"
    files = (meta or {}).get("files")
    if meta is None:
        return "meta.json: missing"
    if files is None:
        return None
    found, problems = read_back(path, {name: 0 for name in files})
    for name, (size, crc) in sorted(files.items()):
        if name not in found:
            continue
        got_size, got_crc = found[name]
        if got_size != size:
            problems.append(f"{name}: {got_size} bytes, {size} recorded")
        elif got_crc != crc:
            problems.append(f"{name}: checksum mismatch ({CHECKSUM} {got_crc:08x}, {crc:08x} recorded)")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return sorted(problems)[0] + more

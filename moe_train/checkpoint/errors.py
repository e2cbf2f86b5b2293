"""Checkpoint I/O failures as one line that names the file or directory: the error a user reads.

Writing and reading a checkpoint fails in many shapes — an `OSError` from `open`, a `RuntimeError` from
torch's zip writer (`unexpected pos 704 vs 598` when the disk fills up), an `UnpicklingError` from a damaged
`trainer.pt`, DCP's `CheckpointException` (a `BaseException`, which no `except Exception` catches) wrapping
any of those per rank. `checkpoint_io` turns each into a `CheckpointError` (directory.py) saying what was
being done, where, and — when the filesystem is full — that there is no space left on the device.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
from collections.abc import Iterator

from torch.distributed.checkpoint.api import CheckpointException

from .directory import CheckpointError

# a write failure with less than this free is reported as a full disk: a failed write leaves its partial
# file behind, so the filesystem stays (nearly) full until the next save clears the leftovers
FULL_BELOW_BYTES = 64 << 20
# what torch's zip reader and writer say when a file is cut short or a write did not land
_STREAM_ERRORS = ("PytorchStreamWriter", "PytorchStreamReader", "unexpected pos", "inline_container")


def _causes(e: BaseException) -> list[BaseException]:
    """`e`, what it wraps (DCP keeps each rank's exception in `failures`) and their chained causes."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x in out:
            continue
        out.append(x)
        if isinstance(x, CheckpointException):
            todo += [v[0] if isinstance(v, tuple) else v for v in x.failures.values()]
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]
    return out


def _free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def describe(e: BaseException, what: str, where: str) -> str:
    """One line for the user: what failed, where, and why in their terms."""
    causes = _causes(e)
    named = next((c.filename for c in causes if isinstance(c, OSError) and c.filename), None)
    place = f"{named} (under {where})" if named and not str(named).startswith(where) else named or where
    full = any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in causes)
    writing = any(s in str(c) for c in causes for s in _STREAM_ERRORS)
    free = _free_bytes(where)
    if full or (writing and free is not None and free < FULL_BELOW_BYTES):
        return (
            f"{what} failed: no space left on device at {place} ({free} bytes free); "
            "the previous checkpoint is intact — free space or point the run directory elsewhere"
        )
    root = causes[-1] if len(causes) > 1 and isinstance(e, CheckpointException) else e
    return f"{what} failed at {place}: {type(root).__name__}: {str(root).strip() or 'no detail'}"


@contextlib.contextmanager
def checkpoint_io(what: str, where: str) -> Iterator[None]:
    """Re-raise a filesystem or format failure inside as CheckpointError naming `where`."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, CheckpointException) as e:
        raise CheckpointError(describe(e, what, where)) from None
    except RuntimeError as e:
        if not any(s in str(e) for s in _STREAM_ERRORS):
            raise  # not a file's fault (a collective, a bug): the caller's guard names it
        raise CheckpointError(describe(e, what, where)) from None

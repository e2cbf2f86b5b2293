"""One writer per run directory: a lease file with a heartbeat, without flock (NFS has no dependable one).

`<run dir>/writer.lease` is a small JSON record: who holds it (host, pid, the launch's run id), a random
token, and the wall-clock time of its last heartbeat. The holder rewrites the record in place every T/4
seconds from a daemon thread (T: `trainer.lease_timeout_s`) and removes the file when it is done or the
process exits.

A lease is stale when its last heartbeat is more than T seconds old (so the nodes' clocks must agree to well
within T), or when its holder is a process of this host that no longer exists. Acquiring:
  - no lease file: create it with O_EXCL (atomic on NFS v3 and later): of two runs, one gets it;
  - a stale lease, or one this very process holds (a trainer built earlier and never closed): take it over;
  - a live lease of the same run — the same SLURM job id after a requeue, the same torchrun run id after an
    elastic restart — whose old attempt may still be dying: wait until it goes stale, at most T plus one
    heartbeat, then take it over;
  - any other live lease: CheckpointError (the run exits 2), naming the holder.
A takeover renames the stale file aside and checks that what it moved is the record it judged stale (else it
puts it back), then creates its own with O_EXCL, so of two runs taking over at once one wins. The holder
checks at every heartbeat, and the checkpointer before every commit, that the file still holds its token.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .directory import CheckpointError

LEASE_NAME = "writer.lease"
_RECORD_BYTES = 512  # fixed size, rewritten in place: a reader never sees the file shrink or grow
# races that send acquire round again; more means a filesystem that does not keep O_EXCL
_ATTEMPTS = 100


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _parse(path: str) -> dict[str, Any] | None:
    """The record in `path`; None when there is no such file. A record caught mid-write is read again; one
    that never parses counts as written when the file was last modified."""
    for _ in range(5):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(raw.decode("utf-8").strip())
            if isinstance(rec, dict) and {"host", "pid", "token", "time"} <= set(rec):
                return rec
        except ValueError:
            pass
        time.sleep(0.05)
    try:
        mtime = os.path.getmtime(path)
    except FileNotFoundError:
        return None
    return {"host": "?", "pid": -1, "run": None, "token": f"unreadable-{mtime}", "time": mtime}


class RunLease:
    """The writer lease of one run directory; `acquire` it before writing anything there."""

    def __init__(self, run_dir: str, run_id: str | None, timeout_s: float) -> None:
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LEASE_NAME)
        self.run_id, self.timeout_s, self.interval = run_id, timeout_s, timeout_s / 4
        self.token, self.host, self.pid = uuid.uuid4().hex, socket.gethostname(), os.getpid()
        self.lost = False
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- acquire
    def acquire(self) -> None:
        """Hold the lease, waiting up to T for a live one of the same run; CheckpointError otherwise."""
        deadline: float | None = None
        for _ in range(_ATTEMPTS):
            if self._create():
                break
            rec = _parse(self.path)
            if rec is None:  # released between our create and our read
                continue
            if self._stale(rec) or (rec["host"], rec["pid"]) == (self.host, self.pid):
                if self._take_over(rec):
                    break
                continue
            if self.run_id is None or rec.get("run") != self.run_id:
                raise CheckpointError(self._busy(rec, "another run"))
            deadline = deadline or time.monotonic() + self.timeout_s + self.interval
            if time.monotonic() > deadline:
                raise CheckpointError(
                    self._busy(rec, f"an earlier attempt of this run ({self.run_id}) that lives")
                )
            time.sleep(min(self.interval, 1.0))
        else:
            raise CheckpointError(f"writer lease {self.path}: could not create or take it over")
        self._thread = threading.Thread(target=self._beat, name="writer-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _record(self) -> bytes:
        rec = {
            "host": self.host,
            "pid": self.pid,
            "run": self.run_id,
            "token": self.token,
            "time": time.time(),
        }
        return json.dumps(rec).encode("utf-8").ljust(_RECORD_BYTES)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise CheckpointError(f"writer lease {self.path}: cannot create it ({e.strerror or e})") from None
        os.pwrite(fd, self._record(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    def _stale(self, rec: dict[str, Any]) -> bool:
        if time.time() - float(rec["time"]) > self.timeout_s:
            return True
        return rec["host"] == self.host and not _alive(int(rec["pid"]))

    def _take_over(self, judged: dict[str, Any]) -> bool:
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _parse(aside)
        if moved is None or moved["token"] != judged["token"]:  # moved a fresh lease: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass  # a third run created one meanwhile; that one stands
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self._create()

    def _busy(self, rec: dict[str, Any], who: str) -> str:
        age = time.time() - float(rec["time"])
        run = f", run {rec['run']}" if rec.get("run") else ""
        return (
            f"run directory {self.run_dir} is in use by {who}: writer lease {self.path} is held by pid "
            f"{rec['pid']} on {rec['host']}{run}, last heartbeat {age:.0f} s ago (stale after "
            f"trainer.lease_timeout_s={self.timeout_s:g}); stop that run or choose another run dir"
        )

    # --------------------------------------------------------------------------------------------- hold
    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            rec = _parse(self.path)
            if rec is not None and rec["token"] != self.token:
                self.lost = True  # taken over: this run must not commit again
                return
            if rec is not None and self._fd is not None:
                try:
                    os.pwrite(self._fd, self._record(), 0)
                except OSError:
                    pass  # a missed beat; the next one may get through

    def held(self) -> bool:
        """True while the lease file still holds this lease's token (re-read from the filesystem)."""
        if self.lost or self._fd is None:
            return False
        rec = _parse(self.path)
        return rec is not None and rec["token"] == self.token

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this lease's. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._fd is None:
            return
        rec = _parse(self.path)
        if rec is not None and rec["token"] == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None

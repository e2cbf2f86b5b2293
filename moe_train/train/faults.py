"""Surviving the cluster: preemption signals, collectives that hang, and the exit statuses a launcher reads.

A job scheduler warns before it kills (SLURM: SIGUSR1 or SIGTERM some seconds ahead). The handler only sets a
flag; the training loop finishes the step it is in, every rank agrees to stop, the collective checkpoint is
written and the process exits with EXIT_PREEMPTED, which the launch scripts turn into a requeue. Doing the
work in the handler instead would interleave a save with a half-done step.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

import torch
import torch.distributed as dist

from ..parallel.mesh import Mesh

# Exit statuses of train.py; 2 and 3 predate this module (user error, non-finite loss).
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_COLLECTIVE = 4  # a collective failed or timed out (a peer died or ranks disagree on the program)
EXIT_EVAL = 5  # evaluation failed (e.g. out of memory) after the step's checkpoint was committed
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the training loop after the preemption checkpoint is written."""

    def __init__(self, step: int, signame: str) -> None:
        super().__init__(
            f"stopped at step {step} on {signame}; checkpoint written, continue with trainer.resume=auto"
        )
        self.step = step


class EvaluationError(Exception):
    """Evaluation at a step failed after that step's checkpoint was committed. Not a RuntimeError, so
    `guarded` passes it on instead of reporting a collective failure."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


class CollectiveError(RuntimeError):
    """A collective failed on this rank; the message names the rank and what the collective was for."""


class StopRequest:
    """A flag set by SIGTERM/SIGUSR1, read once per step; installs its handlers only in the main thread.

    The previous handlers are restored by `close()`, so tests that build several trainers in one process
    leave the interpreter as they found it.
    """

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, object] = {}
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, never stops early
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signame = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def agreed(self, mesh: Mesh) -> bool:
        """True on every rank when any rank was signalled: one 1-element all-reduce, so all stop together.

        Ranks that stopped alone would leave their peers waiting in the next step's collectives until the
        timeout; the all-reduce costs microseconds next to a step.
        """
        flag = self.signame is not None
        if not mesh.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=mesh.device)
        with guarded(mesh, "all_reduce of the stop flag"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() and self.signame is None:
            self.signame = "a peer's signal"
        return bool(t.item())


@contextlib.contextmanager
def guarded(mesh: Mesh, what: str) -> Iterator[None]:
    """Re-raise a failing collective as CollectiveError naming this rank and `what` it was doing.

    Backend timeouts say only which transport call gave up; with hundreds of ranks the useful facts are
    which rank, in which phase of which step.
    """
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, CollectiveError) or not mesh.distributed:
            raise
        raise CollectiveError(
            f"rank {mesh.rank} of {mesh.world}: {what} failed (a collective timed out, a peer died, or ranks "
            f"disagree on the program; see parallel.timeout_s): {type(e).__name__}: {e}"
        ) from e


def injected_exit(step: int, rank: int, env: dict[str, str] | None = None) -> None:
    """Fault injection for the restart tests: `MOE_TRAIN_FAULT_EXIT=<rank>@<step>` kills that rank right
    after that step, on the first attempt of an elastic launch only (TORCHELASTIC_RESTART_COUNT 0).

    A hard `os._exit` is the honest model of a lost node: no handler, no checkpoint, peers left waiting.
    """
    env = dict(os.environ) if env is None else env
    spec = env.get("MOE_TRAIN_FAULT_EXIT")
    if not spec or env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    want_rank, _, want_step = spec.partition("@")
    if int(want_rank) == rank and int(want_step) == step:
        print(f"fault injection: rank {rank} exits after step {step}", flush=True)
        os._exit(1)


def injected_eval_fault(step: int, env: dict[str, str] | None = None) -> None:
    """Fault injection for the evaluation tests: `MOE_TRAIN_FAULT_EVAL_OOM=<step>` makes the evaluation at
    that step run out of memory on every rank, as CUDA's allocator would (raising its error type)."""
    env = dict(os.environ) if env is None else env
    if env.get("MOE_TRAIN_FAULT_EVAL_OOM") == str(step):
        raise torch.OutOfMemoryError(f"fault injection: out of memory in evaluation at step {step}")

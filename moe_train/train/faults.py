"""Surviving the cluster: preemption signals, collectives that hang, non-finite steps, and the exit statuses a
launcher reads.

A job scheduler warns before it kills (SLURM: SIGUSR1 or SIGTERM some seconds ahead). The handler only sets a
flag; the training loop finishes the step it is in, every rank agrees to stop, the collective checkpoint is
written and the process exits with EXIT_PREEMPTED, which the launch scripts turn into a requeue. Doing the
work in the handler instead would interleave a save with a half-done step.

Under torchrun a worker's own exit status reaches nobody: the agent restarts the group after any non-zero
exit and reports 1 once it gives up. So a preempted worker asks its agent to shut the group down (no
restart), and rank 0 writes its exit status to `$MOE_TRAIN_STATUS_FILE`, which the launch scripts read.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ..config import TrainerConfig
from ..parallel.mesh import Mesh

# Exit statuses of train.py (docs/launching.md); 1 is left to Python: an unexpected error, with its traceback.
EXIT_OK = 0
EXIT_USER_ERROR = 2  # a bad config or input, or a checkpoint that cannot be written or read: one line
EXIT_NONFINITE = 3  # a non-finite loss (or too many in a row, or non-finite weights at a save)
EXIT_COLLECTIVE = 4  # a collective failed or timed out (a peer died or ranks disagree on the program)
EXIT_EVAL = 5  # evaluation failed (e.g. out of memory) after the step's checkpoint was committed
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STATUS_FILE_ENV = "MOE_TRAIN_STATUS_FILE"


class NonFiniteLossError(RuntimeError):
    """A non-finite loss, or weights, stopped the run (exit 3); nothing non-finite was committed."""


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
        """Restore the previous handlers — unless a stop was requested: the process is then on its way out,
        and a second signal (torchrun passes SIGTERM on to every worker) must not kill it half way."""
        if self.signame is None:
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


def nonfinite_verdict(sums: Mapping[str, Any], step: int, streak: int, t: TrainerConfig) -> int:
    """The count of non-finite losses in a row after step `step` (counted from 1, as in the log): 0 for a
    finite loss. Raises NonFiniteLossError when skipping is off or the streak passes
    `trainer.max_consecutive_skips`: weights that have become non-finite give a non-finite loss on every
    step, and skipping them forever would end "successfully" with nothing learnt."""
    if math.isfinite(sums["loss"]):
        return 0
    if not t.skip_nonfinite:
        raise NonFiniteLossError(
            f"non-finite loss {sums['loss']} at step {step} (lm_loss {sums['lm_loss']}); "
            "weights were not updated. Lower optim.lr, check the data, resume from a checkpoint, "
            "or set trainer.skip_nonfinite=true to skip such steps."
        )
    if streak + 1 > t.max_consecutive_skips:
        raise NonFiniteLossError(
            f"non-finite loss on {streak + 1} steps in a row (steps {step - streak} to {step}; "
            f"trainer.max_consecutive_skips={t.max_consecutive_skips}): the weights are likely non-finite. "
            "Resume from an earlier checkpoint with a lower optim.lr."
        )
    return streak + 1


def check_finite_weights(model: torch.nn.Module, mesh: Mesh, step: int) -> None:
    """Raise NonFiniteLossError on every rank if any rank holds a non-finite weight: such a checkpoint would
    only be resumed into NaN, and committing it could prune the last good one. One pass over the weights,
    small next to writing them."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
    flag = (~ok).to(device=mesh.device, dtype=torch.int32).reshape(1)
    if mesh.distributed:
        with guarded(mesh, "all_reduce of the finite-weights check"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise NonFiniteLossError(
            f"non-finite weights after step {step}: its checkpoint was not written and earlier ones are "
            "kept. Resume from the latest checkpoint with a lower optim.lr."
        )


def record_status(status: int | None, env: Mapping[str, str] | None = None) -> None:
    """Rank 0 writes `status` to `$MOE_TRAIN_STATUS_FILE` (when set) for the launch script to exit with;
    status None clears the file at start-up, so a status left by an earlier attempt is never read."""
    env = os.environ if env is None else env
    path = env.get(STATUS_FILE_ENV)
    if not path or env.get("RANK", "0") != "0":
        return
    if status is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{status}\n")


def stop_elastic_agent(env: Mapping[str, str] | None = None) -> None:
    """After a preemption checkpoint under torchrun: SIGTERM to this node's agent, which then shuts its
    workers down instead of restarting them (it restarts after any non-zero exit, 75 included). Local rank
    0 alone sends it: the agent takes a second signal during its shutdown, not a third."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and env.get("LOCAL_RANK", "0") == "0":
        os.kill(os.getppid(), signal.SIGTERM)


def injected_eval_fault(step: int, env: dict[str, str] | None = None) -> None:
    """Fault injection for the evaluation tests: `MOE_TRAIN_FAULT_EVAL_OOM=<step>` makes the evaluation at
    that step run out of memory on every rank, as CUDA's allocator would (raising its error type)."""
    env = dict(os.environ) if env is None else env
    if env.get("MOE_TRAIN_FAULT_EVAL_OOM") == str(step):
        raise torch.OutOfMemoryError(f"fault injection: out of memory in evaluation at step {step}")

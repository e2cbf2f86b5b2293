"""Asynchronous, autograd-aware all-to-all: the communication primitive behind expert dispatch.

An exchange is split into two autograd nodes, *start* and *wait*:

    pending = A2A(out_splits, in_splits, group)
    buf = a2a_start(x, pending)     # launches the collective, returns the (not yet filled) output buffer
    ...                             # any compute here overlaps the transfer
    y = a2a_wait(buf, pending)      # blocks (CPU/gloo) or orders the streams (CUDA/NCCL); y is valid

In the backward pass the roles swap: the backward of *wait* launches the reverse exchange of the gradient and
the backward of *start* waits for it, so whatever autograd (or an explicit scheduler) runs between those two
nodes overlaps the backward transfer too.  `all_to_all` does start+wait at once for plain use.
The same code runs on gloo (async work handles) and NCCL (its own stream; `wait` makes the current stream
wait without blocking the host).

`exchange_start` / `exchange_wait` are the same exchange outside autograd, for the overlap engine
(`parallel/overlap.py`), which cuts the graph at every exchange and moves gradients back by hand: a backward
exchange left pending inside one autograd call could not be overlapped with anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class A2A:
    """One exchange: how many rows go to / come from each peer, and its in-flight state."""

    out_splits: list[int]  # rows received from each peer
    in_splits: list[int]  # rows sent to each peer
    group: Any
    work: Any = None
    bwd_work: Any = None
    bwd_out: torch.Tensor | None = None
    log: list[str] | None = field(default=None, repr=False)  # optional event log for ordering tests
    name: str = "a2a"

    def _note(self, event: str) -> None:
        if self.log is not None:
            self.log.append(f"{event}:{self.name}")


def _launch(x: torch.Tensor, out_rows: int, out_splits: list[int], in_splits: list[int], group: Any):
    out = x.new_empty((out_rows, *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return out, work


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: A2A, *after: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, pending.work = _launch(
            x, sum(pending.out_splits), pending.out_splits, pending.in_splits, pending.group
        )
        pending._note("fwd_start")
        ctx.pending = pending
        ctx.n_after = len(after)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pending: A2A = ctx.pending
        pending.bwd_work.wait()
        pending._note("bwd_wait")
        out = pending.bwd_out
        pending.bwd_out = pending.bwd_work = None
        return (out, None) + (None,) * ctx.n_after


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf: torch.Tensor, pending: A2A) -> torch.Tensor:  # type: ignore[override]
        pending.work.wait()
        pending.work = None
        pending._note("fwd_wait")
        ctx.pending = pending
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pending: A2A = ctx.pending
        pending.bwd_out, pending.bwd_work = _launch(
            grad, sum(pending.in_splits), pending.in_splits, pending.out_splits, pending.group
        )
        pending._note("bwd_start")
        # The value handed to _Start.backward is a placeholder: it waits for bwd_work and returns bwd_out.
        return grad, None


def a2a_start(x: torch.Tensor, pending: A2A, after: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """`after`: tensors whose backward must wait until this exchange's backward finished.

    Collectives must be issued in the same order on every rank. Autograd orders independent branches by
    readiness, which depends on data (e.g. how many experts got tokens), so two exchanges of one layer are
    chained explicitly: listing an earlier exchange's output here makes its backward run after this one's.
    """
    return _Start.apply(x, pending, *after)


def a2a_wait(buf: torch.Tensor, pending: A2A) -> torch.Tensor:
    return _Wait.apply(buf, pending)


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Differentiable all-to-all with uneven splits (start and wait back to back)."""
    pending = A2A(out_splits, in_splits, group)
    return a2a_wait(a2a_start(x, pending), pending)


@dataclass
class Exchange:
    """An all-to-all in flight outside autograd: `out` holds the received rows once `exchange_wait` ran."""

    out: torch.Tensor
    work: Any


def exchange_start(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Exchange:
    """Launch the exchange of x's rows (in_splits[i] rows to peer i, out_splits[i] from it); returns at once.

    On NCCL the transfer runs on the process group's own stream, after the work already queued on the
    current stream; on gloo on its worker threads."""
    out, work = _launch(x.detach(), sum(out_splits), out_splits, in_splits, group)
    return Exchange(out, work)


def exchange_wait(ex: Exchange) -> torch.Tensor:
    """The received rows. NCCL: the current stream waits for the transfer (the host does not); gloo: the
    host waits."""
    ex.work.wait()
    return ex.out


def all_to_all_nograd(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out

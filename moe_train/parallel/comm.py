"""The all-to-all behind expert dispatch: one hop of rows with uneven splits, inside or outside autograd.

`A2AHop` is the eager exchange of the phase programs (model/phases.py): `start` launches one all-to-all per
tensor and returns at once, `wait` returns the received rows. Each is one autograd node over all the hop's
tensors, so the roles swap in backward: the backward of `wait` launches the reverse exchanges of the
gradients and the backward of `start` waits for them, and whatever autograd runs between those two nodes
overlaps the backward transfer. One node per hop also fixes the order of the reverse exchanges on every rank
(collectives must be issued in the same order everywhere; autograd orders independent branches by
readiness, which depends on data).

`exchange_start` / `exchange_wait` are the same transfer outside autograd, for the overlap engine
(`parallel/overlap.py`), which cuts the graph at every exchange and moves gradients back by hand: a backward
exchange left pending inside one autograd call could not be overlapped with anything.

The same code runs on gloo (async work handles) and NCCL (its own stream; a wait makes the current stream
wait without blocking the host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Exchange:
    """An all-to-all in flight outside autograd: `out` holds the received rows once `exchange_wait` ran."""

    out: torch.Tensor
    work: Any


def exchange_start(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Exchange:
    """Launch the exchange of x's rows (in_splits[i] rows to peer i, out_splits[i] from it); returns at once.

    On NCCL the transfer runs on the process group's own stream, after the work already queued on the
    current stream; on gloo on its worker threads."""
    x = x.detach()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return Exchange(out, work)


def exchange_wait(ex: Exchange) -> torch.Tensor:
    """The received rows. NCCL: the current stream waits for the transfer (the host does not); gloo: the
    host waits."""
    ex.work.wait()
    return ex.out


@dataclass
class _InFlight:
    """One use of a hop: the forward exchanges, then the backward's."""

    hop: A2AHop
    forward: list[Exchange] = field(default_factory=list)
    backward: list[Exchange] = field(default_factory=list)


@dataclass
class A2AHop:
    """One all-to-all hop: send_splits[i] rows of each tensor to peer i, recv_splits[i] from it.

    log: optional list receiving "fwd_start:<name>", "fwd_wait:<name>", "bwd_start:<name>", "bwd_wait:<name>"
    events (ordering tests)."""

    name: str
    send_splits: list[int]
    recv_splits: list[int]
    group: Any
    log: list[str] | None = field(default=None, repr=False)

    def note(self, event: str) -> None:
        if self.log is not None:
            self.log.append(f"{event}:{self.name}")

    def start(self, tensors: tuple[torch.Tensor, ...]) -> tuple[_InFlight, tuple[torch.Tensor, ...]]:
        state = _InFlight(self)
        return state, _Start.apply(state, *tensors)

    def wait(self, handle: tuple[_InFlight, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        state, bufs = handle
        return _Wait.apply(state, *bufs)


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: _InFlight, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        hop = state.hop
        state.forward = [exchange_start(x, hop.recv_splits, hop.send_splits, hop.group) for x in xs]
        hop.note("fwd_start")
        ctx.state = state
        return tuple(e.out for e in state.forward)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        state: _InFlight = ctx.state
        out = tuple(exchange_wait(e) for e in state.backward)
        state.hop.note("bwd_wait")
        state.backward = []
        return (None, *out)


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: _InFlight, *bufs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        for e in state.forward:
            e.work.wait()
        state.forward = []
        state.hop.note("fwd_wait")
        ctx.state = state
        return tuple(b.view_as(b) for b in bufs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        state: _InFlight = ctx.state
        hop = state.hop
        # every rank takes part in the reverse exchange, whatever reached this node's outputs
        state.backward = [exchange_start(g, hop.send_splits, hop.recv_splits, hop.group) for g in grads]
        hop.note("bwd_start")
        # the values handed to _Start.backward are placeholders: it waits and returns the received rows
        return (None, *grads)

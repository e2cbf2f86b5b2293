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

FP8 dispatch (DeepSeek-V3's recipe, `trainer.dtype=fp8`): a hop with `fp8_rows` sends its first tensor as
E4M3 values with their 1×128 tile scales, one packed byte row per row (`ops.fp8.pack_rows`, about half of
bf16's bytes), and the receiver gets the dequantised rows. The tiles are those the experts' FP8 GEMM cuts
from its input, and quantising a dequantised tile gives back the same E4M3 values, so the FP8 experts see
what they would have seen without the exchange. Gradients travel back in their own dtype, and the
quantisation passes them straight through (the recipe's combine and its backward stay bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..ops.fp8 import pack_rows, unpack_rows


@dataclass
class Exchange:
    """An all-to-all in flight outside autograd: `out` holds the received rows once `exchange_wait` ran."""

    out: torch.Tensor
    work: Any
    fp8_as: torch.dtype | None = None  # FP8 rows: `out` holds packed bytes, dequantised to this dtype


def exchange_start(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any, fp8: bool = False
) -> Exchange:
    """Launch the exchange of x's rows (in_splits[i] rows to peer i, out_splits[i] from it); returns at once.
    fp8: the rows travel as packed E4M3 tiles (see the module's docstring).

    On NCCL the transfer runs on the process group's own stream, after the work already queued on the
    current stream; on gloo on its worker threads."""
    x = x.detach()
    fp8_as = x.dtype if fp8 else None
    if fp8:
        x = pack_rows(x)
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return Exchange(out, work, fp8_as)


def exchange_wait(ex: Exchange) -> torch.Tensor:
    """The received rows. NCCL: the current stream waits for the transfer (the host does not); gloo: the
    host waits."""
    ex.work.wait()
    if ex.fp8_as is None:
        return ex.out
    return unpack_rows(ex.out, ex.fp8_as)


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
    events (ordering tests). fp8_rows: the first tensor travels forward as FP8 tiles (module docstring)."""

    name: str
    send_splits: list[int]
    recv_splits: list[int]
    group: Any
    log: list[str] | None = field(default=None, repr=False)
    fp8_rows: bool = False

    def forward_exchange(self, k: int, x: torch.Tensor) -> Exchange:
        """Launch the forward exchange of the hop's k-th tensor."""
        return exchange_start(x, self.recv_splits, self.send_splits, self.group, self.fp8_rows and k == 0)

    def backward_exchange(self, k: int, grad: torch.Tensor) -> Exchange:
        """Launch the reverse exchange of the k-th received tensor's gradient (in its own dtype)."""
        return exchange_start(grad, self.send_splits, self.recv_splits, self.group)

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
        state.forward = [hop.forward_exchange(k, x) for k, x in enumerate(xs)]
        hop.note("fwd_start")
        ctx.state = state
        # FP8 rows: the packed bytes cannot carry a gradient, so an empty tensor of the rows' dtype stands
        # in for them between the two nodes; their gradient travels through `state`, as every one does
        return tuple(
            e.out if e.fp8_as is None else x.new_empty(0) for e, x in zip(state.forward, xs, strict=True)
        )

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
        got = [exchange_wait(e) for e in state.forward]
        ctx.placeholders = [e.fp8_as is not None for e in state.forward]
        state.forward = []
        state.hop.note("fwd_wait")
        ctx.state = state
        return tuple(g if g is not b else b.view_as(b) for g, b in zip(got, bufs, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        state: _InFlight = ctx.state
        hop = state.hop
        # every rank takes part in the reverse exchange, whatever reached this node's outputs
        state.backward = [hop.backward_exchange(k, g) for k, g in enumerate(grads)]
        hop.note("bwd_start")
        # the values handed to _Start.backward are placeholders: it waits and returns the received rows
        return (None, *(g.new_empty(0) if p else g for g, p in zip(grads, ctx.placeholders, strict=True)))

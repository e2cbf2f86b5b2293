"""A block's forward as a program of phases, and the eager runner.

The math of a decoder block is written once, as a generator that yields *ops* and receives their results:

    h1, x = yield Compute("attn", self.attention, (h, attend))
    ...
    handle = yield Issue(hop, (rows, meta))     # an exchange leaves (a dispatcher yields these)
    shared = yield Compute("shared", ...)       # compute while it is in flight
    rows, meta = yield Wait(handle)

Whoever runs the program decides what an op costs. `run` (here) computes eagerly under autograd: a Compute
is a call, an exchange is the hop's own autograd-aware start and wait. The overlap engine
(parallel/overlap.py) runs the same program as autograd sub-steps cut at every exchange, exchanges outside
autograd, and interleaves a forward with another micro-batch's backward. Inference runs it under no_grad.
So the eager path, the overlap engine and `generate` cannot disagree about the block, and a new phase or a
new dispatcher is written once.

Rules a program follows so that the overlap engine can cut it: every tensor that carries a gradient from one
sub-step to another is a top-level argument of a Compute and a top-level result of an earlier Compute or
Wait (objects holding such tensors stay inside the sub-step that made them); `join=True` continues the
current sub-step (no cut between this compute and the previous one); an Issue or Wait ends a sub-step.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Program = Generator["Op", Any, Any]


class Hop(Protocol):
    """One all-to-all of a dispatch or combine. `send_splits[i]` rows go to peer i and `recv_splits[i]` come
    from it, over `group`; `start`/`wait` are the eager, autograd-aware exchange (the reverse exchange of the
    gradients runs in backward)."""

    name: str
    send_splits: list[int]
    recv_splits: list[int]
    group: Any

    def start(self, tensors: tuple[torch.Tensor, ...]) -> Any: ...

    def forward_exchange(self, k: int, x: torch.Tensor) -> Any:
        """The forward exchange of the k-th tensor outside autograd (the overlap engine's)."""

    def backward_exchange(self, k: int, grad: torch.Tensor) -> Any:
        """The reverse exchange of the k-th received tensor's gradient outside autograd."""

    def wait(self, handle: Any) -> tuple[torch.Tensor, ...]: ...


@dataclass(slots=True)
class Compute:
    """fn(*args): returns a tensor, a tuple (of tensors and other values) or an object.

    join: continue the current sub-step; deferred_w: fn accepts `taps=` (ops/grouped_gemm.Taps) so that a
    runner may compute its weight gradients later, from its projections' output gradients; layer: for
    logs and profiler ranges (None: the enclosing layer's)."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    join: bool = False
    deferred_w: bool = False
    layer: int | None = None


@dataclass(slots=True)
class Issue:
    """Start the exchange of `tensors` (rows) over `hop`; the result is a handle for `Wait`."""

    hop: Hop
    tensors: tuple[torch.Tensor, ...]


@dataclass(slots=True)
class Wait:
    """Wait for an issued exchange; the result is the tuple of received tensors."""

    handle: Any


@dataclass(slots=True)
class Prepare:
    """A small exchange the host must read before the next phase can be planned (split sizes), with no
    gradient: `start(stream)` launches it (on `stream`, a CUDA side stream, when the runner gives one) and
    `finish(started)` waits and returns the plan. The result is that plan."""

    name: str
    start: Callable[[Any], Any]
    finish: Callable[[Any], Any]


Op = Compute | Issue | Wait | Prepare


def run(program: Program) -> Any:
    """Run a program eagerly (autograd records it like any forward); its return value."""
    result: Any = None
    while True:
        try:
            op = program.send(result)
        except StopIteration as stop:
            return stop.value
        if type(op) is Compute:  # the common op first: this loop is on every block's host path
            result = op.fn(*op.args)
        elif isinstance(op, Issue):
            result = (op.hop, op.hop.start(op.tensors))
        elif isinstance(op, Wait):
            hop, handle = op.handle
            result = hop.wait(handle)
        elif isinstance(op, Prepare):
            result = op.finish(op.start(None))
        else:
            raise TypeError(f"a program yielded {op!r}, not an op")


def done(value: Any) -> Program:
    """A program that yields nothing and returns `value` (a phase with nothing to do)."""
    return value
    yield  # pragma: no cover  (makes this a generator)

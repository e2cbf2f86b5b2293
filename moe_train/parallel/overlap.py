"""Overlap of the expert all-to-all with opposite-direction compute: DualPipe's F&B chunk pair, for real.

The engine runs a stage's forward *program* — the ops its blocks and dispatchers yield (model/phases.py) —
and knows only sub-steps, exchanges and streams, not attention or experts. Consecutive Compute ops with no
exchange between them (and `join`ed) form one sub-step (`SubStep`): a separate autograd graph whose inputs
are fresh leaves, so its backward runs on its own and hands its input gradients on by hand. Exchanges run
outside autograd in both directions: the backward of an exchange is the reverse exchange of the gradient,
started and waited by the engine, never left pending inside an autograd call. Any dispatcher that yields
its hops this way is overlapped (flat, hierarchical, a new one) without a line here.

Programs are generators that `yield` where the other side may run: a forward right after issuing each
exchange (the routing plan's count exchange included); a backward right after issuing each reverse exchange,
and before waiting one if it computed since its last yield (the forward has one exchange more per MoE block
than the backward — the count exchange has no gradient — so this keeps two programs in step). Alone
(`drain`) a program runs straight through, so a lone forward still hides its dispatch under the shared
experts. `pair(forward, backward)` runs the two ping-pong — the backward first, each side until its next
yield. For a MoE block with the flat dispatcher the host then issues, in this order:

    B: finish-bwd, issue combine-bwd
    F: attention + router, issue counts           F.attention   ‖ B.combine-bwd
    B: shared-bwd                                 B.shared-bwd  ‖ F.counts (the host waits for them)
    F: plan, gathers, issue dispatch
    B: routed-experts-bwd (B), issue dispatch-bwd, routed-experts-bwd (W)
                                                  B.experts-bwd ‖ F.dispatch, B.experts-W ‖ B.dispatch-bwd
    F: shared experts, routed experts, issue combine    F.experts ‖ B.dispatch-bwd
    B: attention-bwd, next block's finish-bwd, issue its combine-bwd     B.attention-bwd ‖ F.combine
    F: finish, next block's attention, …           F.attention   ‖ B.combine-bwd

— the order DeepSeek-V3's Figure 4 draws. It follows from three generic rules: a forward waits an exchange
only when an op needs what it brings (so the shared experts run while the dispatch is in flight); a
backward runs any sub-step whose output gradients are all in before it waits a reverse exchange (the shared
experts' backward under the combine's); a sub-step with a deferrable weight pass (taps) computes its input
gradients first and its weight gradients right after the reverse exchange of those is issued (MLP(B),
MLP(W)). At most one exchange per side is in flight, so in-flight buffers are bounded by one exchange per
direction (`max_in_flight` ≤ 2, tested).

Streams and host syncs. On NCCL the exchanges run on the process group's own CUDA stream; a wait makes the
compute stream wait on the work's CUDA event, never the host. The host synchronises on `Prepare` ops (a
dispatcher's count exchange: split sizes size the buffers); they run, with their copy to pinned host
memory, on a side stream, so the host waits for that exchange alone while the compute stream works through
the other side's backward queued meanwhile. Backward needs no host sync (the splits are the forward's).
On gloo the same code runs with async work handles; compute on the main thread overlaps gloo's threads.

SMs. NCCL's kernels run on SMs beside the compute kernels. `parallel.overlap_sm_carveout` (DeepSeek-V3
gives communication 20 SMs) launches the matmuls of ops issued while an exchange is in flight for that many
SMs fewer, so a grid sized for the whole GPU does not wait for the SMs NCCL holds (`sm_carveout`).

Not overlapped: the MTP blocks inside the head op (their own exchanges run inside its backward); full
recomputation is not supported (the config rejects `trainer.recompute=full` with `parallel.overlap`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.phases import Compute, Issue, Prepare, Wait
from ..model.phases import Program as Ops
from ..model.stats import MoEStats
from .comm import Exchange, exchange_wait
from .substep import Ref, SubStep

Program = Generator[None, None, Any]
INPUT: Ref = (-1, 0)


@dataclass
class Transfer:
    """One exchange of a forward: where each sent tensor came from, what arrived."""

    name: str
    layer: int | str
    hop: Any
    origins: list[Ref | None]
    grad: list[bool]  # whether each sent tensor carried a gradient
    outs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StageTape:
    """One (stage, micro-batch) forward: its sub-steps and exchanges, and the stage output.

    events: ("step" | "issue" | "wait", index into records), in forward order."""

    records: list[SubStep | Transfer] = field(default_factory=list)
    events: list[tuple[str, int]] = field(default_factory=list)
    consumers: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # record -> uses of its outs
    output: Any = None  # hidden states, or the weighted loss on the last stage
    output_ref: Ref | None = None

    def add(self, kind: str, record: SubStep | Transfer) -> int:
        self.records.append(record)
        self.events.append((kind, len(self.records) - 1))
        return len(self.records) - 1


def _tensors(value: Any) -> list[torch.Tensor]:
    """The top-level tensors of an op's result (the ones a later sub-step may receive)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


class OverlapEngine:
    """Runs stage programs as sub-steps and exchanges (see the module docstring).

    log: optional list receiving one entry per event, in the order they happen on this rank —
    "F compute attn L3", "F issue dispatch L3", "B wait combine L5", … (the ordering test reads it).
    """

    def __init__(self, log: list[str] | None = None, sm_carveout: int = 0) -> None:
        """sm_carveout: SMs the matmuls of a compute op leave free while an exchange is in flight
        (`parallel.overlap_sm_carveout`; see `_compute`)."""
        if sm_carveout < 0:
            raise ValueError(f"sm_carveout must be >= 0 (SMs left to communication), not {sm_carveout}")
        self.log = log
        self.sm_carveout = sm_carveout
        self._carveout_checked: int | None = None  # the value last checked against the GPU's SM count
        self._side: Any = None  # CUDA side stream for Prepare ops (made on first use)
        self.in_flight = 0  # exchanges issued and not yet waited, over both sides
        self.max_in_flight = 0

    # ------------------------------------------------------------------------------------ bookkeeping
    def _note(self, side: str, what: str, layer: int | str) -> None:
        if self.log is not None:
            self.log.append(f"{side} {what} L{layer}")

    @contextmanager
    def _compute(self, side: str, what: str, layer: int | str) -> Iterator[None]:
        """A compute op: a profiler range (the trace shows which op each kernel belongs to) and, once it ran,
        a log entry. With an exchange in flight and `sm_carveout`, its matmuls (cuBLASLt and the grouped
        GEMM) are launched for that many SMs fewer: NCCL's kernel holds SMs while it runs, and a persistent
        GEMM grid sized for every SM then waits for one of them (docs/performance.md, "Overlap of the
        expert all-to-all")."""
        carve = self.sm_carveout if self.sm_carveout and self.in_flight else None
        if carve is not None and carve != self._carveout_checked:
            check_sm_carveout(carve)  # once per value, not on every op
            self._carveout_checked = carve
        with torch.profiler.record_function(f"{side} {what} L{layer}"), sm_carveout(carve):
            yield
        self._note(side, f"compute {what}", layer)

    def _issued(self, side: str, name: str, layer: int | str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._note(side, f"issue {name}", layer)

    def _waited(self, side: str, name: str, layer: int | str) -> None:
        self.in_flight -= 1
        self._note(side, f"wait {name}", layer)

    def _side_stream(self, like: torch.Tensor) -> Any:
        if not like.is_cuda:
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(device=like.device)
        return self._side

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self, ops: Ops, x: torch.Tensor, stats: MoEStats | None, weight: float, side: str = "F"
    ) -> Program:
        """Program running the stage forward `ops` (a stage's `program(..., phases=True)`) with input x;
        returns its StageTape. weight: the micro-batch's share of the loss (scales the balance terms the
        sub-steps backpropagate themselves)."""
        tape = StageTape()
        where: dict[int, Ref] = {id(x): INPUT}
        step: SubStep | None = None
        layer: int | str = "-"
        result: Any = None

        def close() -> None:
            nonlocal step
            if step is not None:
                step.close(stats, weight)
                step = None

        while True:
            try:
                op = ops.send(result)
            except StopIteration as stop:
                close()
                tape.output, tape.output_ref = stop.value, where.get(id(stop.value))
                return tape
            if isinstance(op, Compute):
                layer = layer if op.layer is None else op.layer
                if step is None or not op.join:
                    close()
                    step = SubStep(layer, len(stats.records) if stats is not None else 0)
                    index = tape.add("step", step)
                args = [self._cut(a, step, index, where, tape) for a in op.args]
                if op.deferred_w:
                    step.tap_name = op.name
                with self._compute(side, op.name, layer), torch.enable_grad():
                    result = op.fn(*args, taps=step.taps) if op.deferred_w else op.fn(*args)
                step.names.append(op.name)
                for t in _tensors(result):
                    where[id(t)] = (index, len(step.outs))
                    step.outs.append(t)
                    step.own.add(id(t))
            elif isinstance(op, Issue):
                close()
                hop = op.hop
                origins = [where.get(id(t)) for t in op.tensors]
                rec = Transfer(hop.name, layer, hop, origins, [t.requires_grad for t in op.tensors])
                for o in origins:
                    if o is not None:
                        tape.consumers[o[0]] += 1
                sent = [hop.forward_exchange(k, t) for k, t in enumerate(op.tensors)]
                self._issued(side, hop.name, layer)
                result = (tape.add("issue", rec), sent)
                yield
            elif isinstance(op, Wait):
                close()
                index, sent = op.handle
                rec = tape.records[index]
                rec.outs = [exchange_wait(e).requires_grad_(g) for e, g in zip(sent, rec.grad, strict=True)]
                for k, t in enumerate(rec.outs):
                    where[id(t)] = (index, k)
                tape.events.append(("wait", index))
                self._waited(side, rec.name, rec.layer)
                result = tuple(rec.outs)
            elif isinstance(op, Prepare):
                started = op.start(self._side_stream(x))
                self._issued(side, op.name, layer)
                yield
                result = op.finish(started)  # the host sync: split sizes
                self._waited(side, op.name, layer)
            else:
                raise TypeError(f"a program yielded {op!r}, not an op")

    @staticmethod
    def _cut(a: Any, step: SubStep, index: int, where: dict[int, Ref], tape: StageTape) -> Any:
        """An op's argument as the sub-step sees it: its own outputs as they are, any other tensor as a leaf
        (once per tensor) whose gradient goes back to where the tensor came from."""
        if not isinstance(a, torch.Tensor) or id(a) in step.own:
            return a
        leaf = step.cuts.get(id(a))
        if leaf is None:
            origin = where.get(id(a))
            if a.requires_grad and origin is None:
                raise RuntimeError(
                    f"a tensor with a gradient entered sub-step '{step.name or '?'}' (layer {step.layer}) "
                    "without being a result of an earlier op: see the rules in model/phases.py"
                )
            leaf = step.cuts[id(a)] = a.detach().requires_grad_(a.requires_grad)
            step.leaves.append(leaf)
            step.origins.append(origin)
            if origin is not None:
                tape.consumers[origin[0]] += 1
        return leaf

    # --------------------------------------------------------------------------------------- backward
    def backward(
        self, tape: StageTape, grad: torch.Tensor | None, mode: str = "BW", side: str = "B"
    ) -> Program:
        """Program of the stage's backward; returns the gradient of the stage input (None where it has
        none). grad: the gradient of the stage output (None on the last stage: the loss). mode 'BW' (input
        and weight gradients) or 'B' (input gradients; `weights` later)."""
        if mode not in ("B", "BW"):
            raise ValueError(f"backward mode must be 'B' or 'BW', not {mode!r}")
        acc: dict[Ref, torch.Tensor] = {}
        remaining = dict(tape.consumers)
        if tape.output_ref is not None:
            acc[tape.output_ref] = torch.ones_like(tape.output) if grad is None else grad
        events = list(reversed(tape.events))
        done: set[int] = set()
        in_flight: dict[int, list[Exchange]] = {}
        state = {"computed": False, "w": None}

        def add(ref: Ref | None, g: torch.Tensor | None) -> None:
            if ref is None:
                return
            remaining[ref[0]] = remaining.get(ref[0], 0) - 1
            if g is not None:
                acc[ref] = g if ref not in acc else acc[ref] + g

        def flush_w() -> None:
            s = state["w"]
            if s is not None:
                state["w"] = None
                with self._compute(side, f"{s.tap_name}-W", s.layer):
                    s.weights()

        def run_step(index: int) -> None:
            flush_w()
            s = tape.records[index]
            grads = [acc.pop((index, k), None) for k in range(len(s.outs))]
            with self._compute(side, s.name, s.layer):
                leaf_grads = s.backward(grads, "B" if mode == "B" or s.tap_name else "BW")
            if mode == "BW" and s.tap_name:
                state["w"] = s  # its weight gradients run under the next reverse exchange
            for origin, g in zip(s.origins, leaf_grads, strict=True):
                add(origin, g)
            done.add(index)
            state["computed"] = True

        for i, (kind, index) in enumerate(events):
            if kind == "step":
                if index not in done:
                    run_step(index)
            elif kind == "wait":  # the forward waited here: the gradients' reverse exchange leaves
                rec = tape.records[index]
                grads = [acc.pop((index, k), None) for k in range(len(rec.outs))]
                # every rank takes part, gradient or not
                grads = [
                    torch.zeros_like(o) if g is None else g for o, g in zip(rec.outs, grads, strict=True)
                ]
                hop = rec.hop
                in_flight[index] = [hop.backward_exchange(k, g) for k, g in enumerate(grads)]
                self._issued(side, rec.name, rec.layer)
                flush_w()
                state["computed"] = False
                yield
            else:  # the forward issued here: wait for the gradients of what it sent
                for later, j in events[i + 1 :]:
                    if later == "step" and j not in done and remaining.get(j, 0) <= 0:
                        run_step(j)
                flush_w()
                if state["computed"]:
                    state["computed"] = False
                    yield
                rec = tape.records[index]
                got = [exchange_wait(e) for e in in_flight.pop(index)]
                self._waited(side, rec.name, rec.layer)
                for origin, g, needs in zip(rec.origins, got, rec.grad, strict=True):
                    add(origin, g if needs else None)
        flush_w()
        if mode == "BW":
            tape.records, tape.events = [], []  # B keeps the sub-steps: W still needs their output gradients
        return acc.get(INPUT)

    def weights(self, tape: StageTape, params: list[nn.Parameter]) -> None:
        """W after a B pass: each sub-step's parameter gradients, no communication."""
        for rec in tape.records:
            if isinstance(rec, SubStep) and rec.has_weights:
                rec.weights(params)
        tape.records, tape.events = [], []


def check_sm_carveout(sms: int) -> None:
    """A carveout must leave the current GPU at least one SM (no GPU: nothing to check)."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        if sms >= total:
            raise ValueError(
                f"parallel.overlap_sm_carveout={sms} leaves no SM for compute: allowed 0 … {total - 1} "
                f"on {torch.cuda.get_device_name()}"
            )


@contextmanager
def sm_carveout(sms: int | None) -> Iterator[None]:
    """Matmuls launched inside target all SMs but `sms` (None: all), through torch's experimental SM
    carveout — a process-wide setting, restored on exit. Only CUDA matmuls read it."""
    if sms is None:
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)


# ------------------------------------------------------------------------------------------- running
def drain(program: Program) -> Any:
    """Run a program alone, straight through; its return value."""
    while True:
        try:
            next(program)
        except StopIteration as stop:
            return stop.value


def within(context: Callable[[], AbstractContextManager], program: Program) -> Program:
    """`program` with `context()` entered only while the program itself runs: each of its resumptions
    runs inside a fresh context, and whatever runs between them (the other side of an F&B pair) outside.
    The executor runs forwards under the trainer's autocast this way and backwards outside it, as autocast
    asks: a backward inside autocast would re-cast the fp32 gradients it meets and keep the copies."""
    value: Any = None
    while True:
        with context():
            try:
                op = program.send(value)
            except StopIteration as stop:
                return stop.value
        value = yield op


def pair(forward: Program, backward: Program) -> tuple[Any, Any]:
    """Run a forward and a backward program interleaved (the F&B pair): the backward first, then each side
    until its next yield (an exchange just issued), alternating; once one side ends the other runs on.
    Returns (forward's value, backward's value)."""
    progs: list[Iterator] = [backward, forward]
    values: list[Any] = [None, None]
    alive = [True, True]
    i = 0
    while any(alive):
        if alive[i]:
            try:
                next(progs[i])
            except StopIteration as stop:
                values[i] = stop.value
                alive[i] = False
        if alive[1 - i]:
            i = 1 - i
    return values[1], values[0]

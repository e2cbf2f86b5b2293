"""Overlap of the expert all-to-all with opposite-direction compute: DualPipe's F&B chunk pair, for real.

A pipeline stage's forward runs as a *program* of sub-steps. Each MoE block is cut into

    attention (+ router, routing plan)  |  dispatch  |  shared experts  |  routed experts  |  combine  |  sum

where the compute sub-steps (attention, shared experts, routed experts, sum) are separate autograd graphs:
every input is a fresh leaf (`_cut`), so a sub-step's backward runs on its own and hands its input
gradients on by hand. The all-to-alls between them run outside autograd (`comm.exchange_start` /
`exchange_wait`) in both directions: the backward of an exchange is the reverse exchange of the gradient,
started and waited by the engine, never left pending inside an autograd call. The same cuts split B from W:
B asks each compute sub-step for its input gradients only (keeping its output gradients), W later for its
parameters only, and W never repeats a communication. Dense blocks, the embedding and the head (with the MTP
blocks, whose own all-to-alls run inside it, not overlapped) are one compute sub-step each.

Programs are generators that `yield` where the other side may run: a forward right after issuing each
exchange (the routing plan's count exchange included), a backward right after issuing each exchange and
after its shared-experts backward (three yields per MoE block on each side, so two programs stay in step).
Alone (`drain`) a program runs straight through, so a lone forward still hides its dispatch under the
shared experts. `pair(forward, backward)` runs the two ping-pong — the backward first, each side until its
next yield. Per MoE block of each side the host then issues, in this order:

    B: sum-bwd, issue combine-bwd
    F: attention + router, issue counts           F.attention   ‖ B.combine-bwd
    B: shared-bwd                                 B.shared-bwd  ‖ F.counts (the host waits for them)
    F: plan, gathers, issue dispatch
    B: routed-experts-bwd (B), issue dispatch-bwd, routed-experts-bwd (W)
                                                  B.experts-bwd ‖ F.dispatch, B.experts-W ‖ B.dispatch-bwd
    F: shared experts, routed experts, issue combine    F.experts ‖ B.dispatch-bwd
    B: attention-bwd, next block's sum-bwd, issue its combine-bwd     B.attention-bwd ‖ F.combine
    F: sum, next block's attention, …              F.attention   ‖ B.combine-bwd

— the order DeepSeek-V3's Figure 4 draws: each exchange is in flight under the other direction's largest
compute of the moment. The routed experts' backward is split as there (MLP(B), MLP(W)): input gradients, so
the dispatch's backward leaves early, then weight gradients under it (from the projections' output gradients
the B pass kept — `Step.taps` — so no GEMM runs twice). At most one exchange per side is in flight (a side
waits its exchange before issuing the next), so in-flight buffers are bounded by one exchange per direction
(`max_in_flight` ≤ 2, tested).

Streams and host syncs. On NCCL the exchanges run on the process group's own CUDA stream; a wait makes the
compute stream wait on the work's CUDA event, never the host. The one host synchronisation per MoE block and
forward is the routing plan's count exchange (split sizes size the buffers; the receiver's slot counts come
with it). It runs, with its copy to pinned host memory, on a side stream (`dispatch.route_start`), so the
host waits for that exchange alone while the compute stream works through the other side's shared-experts
backward queued meanwhile; the GPU idles only if that is shorter than the exchange's latency plus the host's
time to issue the gathers. Backward needs no host sync (the splits are the forward's). On gloo the same code
runs with async work handles; compute on the main thread overlaps gloo's worker threads.

SMs. NCCL's kernels run on SMs beside the compute kernels. `parallel.overlap_sm_carveout` (DeepSeek-V3
gives communication 20 SMs) launches the matmuls of sub-steps issued while an exchange is in flight for that
many SMs fewer, so a grid sized for the whole GPU does not wait for the SMs NCCL holds (`sm_carveout`).

Not overlapped: the MTP blocks inside the head sub-step; full recomputation is not supported (the config
rejects `trainer.recompute=full` with `parallel.overlap`); the hierarchical dispatcher is not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.moe import MoE
from ..model.stats import MoEStats
from ..model.transformer import DecoderLayer, Transformer
from ..ops.gather import gather_rows
from ..ops.grouped_gemm import Taps
from .comm import Exchange, exchange_start, exchange_wait
from .dispatch.flat import AllToAllDispatcher
from .dispatch.rows import (
    Route,
    expand_to_slots,
    route_finish,
    slot_meta,
    slot_weighted_sums,
    sum_over_route,
)
from .pipeline.stages import StageView

Program = Generator[None, None, Any]


def _cut(x: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh leaf holding x's value: the autograd graph ends here and x's gradient is handed on by hand."""
    if x is None:
        return None
    return x.detach().requires_grad_(x.requires_grad)


class Step:
    """One compute sub-step: its inputs as leaves, its outputs with their graph, extra scalar roots.

    `roots` are terms backpropagated with gradient 1 that no later sub-step consumes: the balance-loss terms
    recorded by routers inside the sub-step, already weighted by the micro-batch's share.
    """

    def __init__(
        self,
        name: str,
        leaves: list[torch.Tensor | None],
        outs: list[torch.Tensor],
        roots: list[torch.Tensor],
        layer: int | str = "-",
        taps: Taps | None = None,
    ) -> None:
        self.name, self.leaves, self.outs, self.roots, self.layer = name, leaves, outs, roots, layer
        # (projection output, weight) pairs inside the sub-step (grouped_gemm.Taps): a B pass also keeps
        # the gradients of these outputs, so W runs only the weight-gradient GEMMs from them. They must name
        # every parameter the sub-step uses: W starts from the taps alone.
        self.taps: Taps = taps or []
        self._w: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._w_taps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (output, weight, grad)

    @classmethod
    def run(
        cls,
        name: str,
        fn: Callable[..., Any],
        inputs: list[torch.Tensor | None],
        stats: MoEStats | None = None,
        weight: float = 1.0,
        layer: int | str = "-",
        taps: Taps | None = None,
    ) -> Step:
        """taps: the list fn fills with its (projection output, weight) pairs, if any."""
        leaves = [_cut(x) for x in inputs]
        n0 = len(stats.records) if stats is not None else 0
        with torch.enable_grad():
            outs = fn(*leaves)
            roots = balance_roots(stats, n0, weight)
        return cls(name, leaves, list(outs) if isinstance(outs, tuple) else [outs], roots, layer, taps)

    def backward(self, grads: list[torch.Tensor | None], mode: str) -> list[torch.Tensor | None]:
        """Gradients of the inputs from those of the outputs. mode 'BW': parameters' `.grad` accumulate in
        the same pass; 'B': only the inputs' gradients, the output gradients are kept for `weights`."""
        pairs = [(o, g) for o, g in zip(self.outs, grads, strict=True) if g is not None and o.requires_grad]
        pairs += [(r, torch.ones_like(r)) for r in self.roots]
        if not pairs:
            return [None] * len(self.leaves)
        tensors, grad_tensors = [p[0] for p in pairs], [p[1] for p in pairs]
        need = [x for x in self.leaves if x is not None and x.requires_grad]
        if mode == "BW":
            torch.autograd.backward(tensors, grad_tensors)  # inputs' and parameters' .grad, one traversal
            found = {id(x): x.grad for x in need}
        elif self.taps:
            # input gradients and the taps' output gradients in one traversal that stops short of every
            # weight-gradient GEMM; W starts from the taps (no GEMM of the input path runs twice)
            outs = [t for t, _ in self.taps]
            got = torch.autograd.grad(
                tensors, need + outs, grad_tensors, retain_graph=True, allow_unused=True
            )
            found = {id(x): g for x, g in zip(need, got[: len(need)], strict=True)}
            self._w_taps = [(t, w, g) for (t, w), g in zip(self.taps, got[len(need) :], strict=True)]
            self.taps = []
        else:
            got = (
                torch.autograd.grad(tensors, need, grad_tensors, retain_graph=True, allow_unused=True)
                if need
                else ()
            )
            found = {id(x): g for x, g in zip(need, got, strict=True)}
            self._w = (tensors, grad_tensors)
        self.outs = self.roots = []  # the graph is referenced by the autograd nodes (or `_w`) from here on
        return [found.get(id(x)) if x is not None else None for x in self.leaves]

    def weights(self, params: list[nn.Parameter]) -> None:
        """The deferred weight gradients of a B pass; only `params` accumulate (unreachable ones: skipped)."""
        if self._w_taps:
            wanted = {id(p) for p in params}
            by_weight: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}
            for t, w, g in self._w_taps:
                if g is not None and id(w) in wanted:
                    _, ts, gs = by_weight.setdefault(id(w), (w, [], []))
                    ts.append(t)
                    gs.append(g)
            self._w_taps = []
            # one traversal per weight: from a down-projection output towards the gate/up weight would
            # run the input path's GEMMs again (and count that weight's gradient twice); the traversals
            # may share nodes (no rows: one zero output stands for both), so all but the last keep them
            todo = list(by_weight.values())
            for i, (w, ts, gs) in enumerate(todo):
                torch.autograd.backward(ts, gs, inputs=[w], retain_graph=i < len(todo) - 1)
        if self._w is not None:
            tensors, grad_tensors = self._w
            self._w = None
            torch.autograd.backward(tensors, grad_tensors, inputs=params)


def balance_roots(stats: MoEStats | None, n0: int, weight: float) -> list[torch.Tensor]:
    """The balance-loss terms routers recorded since record n0, weighted (they join the loss with weight)."""
    if stats is None:
        return []
    return [r.balance_loss * weight for r in stats.records[n0:] if r.balance_loss is not None]


@dataclass
class MoEBlockTape:
    """What a MoE block's backward needs: its compute sub-steps and the row movement of its exchanges."""

    layer: int
    dispatcher: AllToAllDispatcher
    route: Route
    attn: Step
    experts: Step
    finish: Step
    shared: Step | None = None
    expert_params: list[nn.Parameter] = field(default_factory=list)  # the routed experts' weights


@dataclass
class StageTape:
    """One (stage, micro-batch) forward: sub-steps in forward order, the stage output."""

    steps: list[Step | MoEBlockTape] = field(default_factory=list)
    output: torch.Tensor | None = None  # hidden states, or the weighted loss on the last stage


@dataclass(frozen=True)
class StageParts:
    """Where a stage's pieces live: the (partial) model, its layer ids in order, first / last flags."""

    model: Transformer
    layer_ids: tuple[int, ...]
    first: bool
    last: bool

    @classmethod
    def of(cls, stage: Transformer | StageView) -> StageParts:
        if isinstance(stage, StageView):
            return cls(stage.model, tuple(stage.layer_ids), stage.first, stage.last)
        return cls(stage, tuple(int(k) for k in stage.layers), stage.is_first, stage.is_last)


def overlappable(layer: nn.Module) -> bool:
    """A decoder block whose MoE layer exchanges tokens through the flat all-to-all dispatcher."""
    return (
        isinstance(layer, DecoderLayer)
        and isinstance(layer.mlp, MoE)
        and isinstance(layer.mlp.dispatcher, AllToAllDispatcher)
    )


class OverlapEngine:
    """Builds sub-step programs for a stage's forward and backward (see the module docstring).

    log: optional list receiving one entry per sub-step event, in the order they happen on this rank —
    "F compute attn L3", "F issue dispatch L3", "B wait combine L5", … (the ordering test reads it).
    """

    def __init__(self, log: list[str] | None = None, sm_carveout: int = 0) -> None:
        """sm_carveout: SMs the matmuls of a compute sub-step leave free while an exchange is in flight
        (`parallel.overlap_sm_carveout`; see `_compute`)."""
        if sm_carveout < 0:
            raise ValueError(f"sm_carveout must be >= 0 (SMs left to communication), not {sm_carveout}")
        self.log = log
        self.sm_carveout = sm_carveout
        self._carveout_checked: int | None = None  # the value last checked against the GPU's SM count
        self._side: Any = None  # CUDA side stream for the plans' count exchanges (made on first use)
        self.in_flight = 0  # exchanges issued and not yet waited, over both sides
        self.max_in_flight = 0

    # ------------------------------------------------------------------------------------ bookkeeping
    def _note(self, side: str, what: str, layer: int | str) -> None:
        if self.log is not None:
            self.log.append(f"{side} {what} L{layer}")

    @contextmanager
    def _compute(self, side: str, what: str, layer: int | str) -> Iterator[None]:
        """A compute sub-step: a profiler range (the trace shows which sub-step each kernel belongs to) and,
        once it ran, a log entry. With an exchange in flight and `sm_carveout`, its matmuls (cuBLASLt and
        the grouped GEMM) are launched for that many SMs fewer: NCCL's kernel holds SMs while it runs, and
        a persistent GEMM grid sized for every SM then waits for one of them — one CTA's tiles run after
        all the others (measured: the routed experts ~40% slower beside a one-channel all-to-all;
        docs/performance.md, "Overlap of the expert all-to-all")."""
        carve = self.sm_carveout if self.sm_carveout and self.in_flight else None
        if carve is not None and carve != self._carveout_checked:
            check_sm_carveout(carve)  # once per value, not on every sub-step
            self._carveout_checked = carve
        with torch.profiler.record_function(f"{side} {what} L{layer}"), sm_carveout(carve):
            yield
        self._note(side, f"compute {what}", layer)

    def _issue(
        self,
        side: str,
        name: str,
        layer: int,
        rows: list[torch.Tensor],
        out_splits: list[int],
        in_splits: list[int],
        group: Any,
    ) -> list[Exchange]:
        """Launch one exchange: an all-to-all per tensor of `rows`, all with the same splits."""
        ex = [exchange_start(x, out_splits, in_splits, group) for x in rows]
        self._issued(side, name, layer)
        return ex

    def _issued(self, side: str, name: str, layer: int) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._note(side, f"issue {name}", layer)

    def _waited(self, side: str, name: str, layer: int) -> None:
        self.in_flight -= 1
        self._note(side, f"wait {name}", layer)

    def _wait(self, side: str, name: str, layer: int, ex: list[Exchange]) -> list[torch.Tensor]:
        out = [exchange_wait(e) for e in ex]
        self._waited(side, name, layer)
        return out

    def _side_stream(self, like: torch.Tensor) -> Any:
        if not like.is_cuda:
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(device=like.device)
        return self._side

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        stage: StageParts,
        x: torch.Tensor,
        stats: MoEStats,
        weight: float,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        side: str = "F",
    ) -> Program:
        """Program of the stage's forward; returns its StageTape. x: token ids on the first stage, hidden
        states elsewhere. head (last stage): hidden states -> the weighted loss to backpropagate."""
        tape = StageTape()
        model = stage.model
        h = x
        if stage.first:
            with self._compute(side, "embed", "-"):
                step = Step.run("embed", model.embed_tokens, [x])
            tape.steps.append(step)
            h = step.outs[0]
        for i in stage.layer_ids:
            layer = model.layers[str(i)]
            if overlappable(layer):
                h, block = yield from self._moe_forward(side, layer, h, stats, weight)
                tape.steps.append(block)
                continue
            if isinstance(layer.mlp, MoE):
                raise ValueError(
                    f"parallel.overlap needs the flat all-to-all dispatcher on every MoE layer: layer {i} "
                    f"has {type(layer.mlp.dispatcher).__name__} (needs parallel.ep > 1 and the alltoall one)"
                )
            with self._compute(side, "dense", i):
                step = Step.run("dense", lambda h, layer=layer: layer(h, stats), [h], stats, weight, i)
            tape.steps.append(step)
            h = step.outs[0]
        if stage.last:
            if head is None:
                raise ValueError("the last stage's forward program needs its head (hidden states -> loss)")
            with self._compute(side, "head", "-"):
                step = Step.run("head", head, [h], stats, weight)
            tape.steps.append(step)
            h = step.outs[0]
        tape.output = h
        return tape

    def _moe_forward(
        self, side: str, layer: DecoderLayer, h: torch.Tensor, stats: MoEStats, weight: float
    ) -> Generator[None, None, tuple[torch.Tensor, MoEBlockTape]]:
        moe: MoE = layer.mlp  # type: ignore[assignment]
        d: AllToAllDispatcher = moe.dispatcher  # type: ignore[assignment]
        lid = layer.layer_id
        B, T, H = h.shape
        # 1. attention + router; the routing plan's count exchange goes out (side stream on CUDA)
        h_in = _cut(h)
        n0 = len(stats.records)
        with self._compute(side, "attn", lid), torch.enable_grad():
            h1 = layer.attention(h_in)
            flat = layer.post_attention_layernorm(h1).reshape(-1, H)
            routing = moe.route(flat, B, T, stats)
            counting = d.route_start(routing.topk_idx, moe.n_experts, self._side_stream(flat))
        self._issued(side, "counts", lid)
        yield
        r = route_finish(counting)  # the host sync of this block: split sizes
        self._waited(side, "counts", lid)
        with torch.profiler.record_function(f"{side} plan L{lid}"), torch.enable_grad():
            send = gather_rows(flat, r.pair_row, r.rows)
            send_meta = gather_rows(slot_meta(routing.topk_idx, routing.topk_weight), r.pair_row, r.rows)
            roots = balance_roots(stats, n0, weight)
        attn = Step("attn", [h_in], [h1, flat, send, send_meta], roots)
        # 2. dispatch: each (token, rank) row and its slot metadata
        d.count("dispatch", r.send_splits, send)
        ex = self._issue(side, "dispatch", lid, [send, send_meta], r.recv_splits, r.send_splits, d.group)
        yield
        # 3. shared experts while the dispatch is in flight
        shared = None
        if moe.shared_experts is not None:
            with self._compute(side, "shared", lid):
                shared = Step.run("shared", moe.shared_experts, [flat])
        recv, recv_meta = self._wait(side, "dispatch", lid, ex)
        recv.requires_grad_(send.requires_grad)
        recv_meta.requires_grad_(send_meta.requires_grad)

        # 4. routed experts on the received rows; each row's gate-weighted sum over its slots
        taps: Taps = []

        def experts(rows: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
            slots = d.receive(meta, r, moe.n_experts)
            y = moe.experts(expand_to_slots(rows, slots), slots.local_counts, taps)
            return slot_weighted_sums(y, slots)

        with self._compute(side, "experts", lid):
            exp = Step.run("experts", experts, [recv, recv_meta], taps=taps)
        partial = exp.outs[0]
        # 5. combine: the partial sums go back to the tokens' ranks
        d.count("combine", r.recv_splits, partial)
        ex = self._issue(side, "combine", lid, [partial], r.send_splits, r.recv_splits, d.group)
        yield
        (back,) = self._wait(side, "combine", lid, ex)
        back.requires_grad_(partial.requires_grad)

        # 6. a token's partial sums, the shared experts, the residual (the order of MoE.forward and _block)
        def finish(h1: torch.Tensor, back: torch.Tensor, shared_out: torch.Tensor | None) -> torch.Tensor:
            y = sum_over_route(back, r)
            if shared_out is not None:
                y = y + shared_out
            return h1 + y.view(B, T, H)

        with self._compute(side, "finish", lid):
            fin = Step.run("finish", finish, [h1, back, None if shared is None else shared.outs[0]])
        block = MoEBlockTape(lid, d, r, attn, exp, fin, shared, list(moe.experts.parameters()))
        return fin.outs[0], block

    # --------------------------------------------------------------------------------------- backward
    def backward(
        self, tape: StageTape, grad: torch.Tensor | None, mode: str = "BW", side: str = "B"
    ) -> Program:
        """Program of the stage's backward; returns the gradient of the stage input (None on the first
        stage). grad: the gradient of the stage output (None on the last stage: the loss). mode 'BW' (input
        and weight gradients) or 'B' (input gradients; `weights` later)."""
        if mode not in ("B", "BW"):
            raise ValueError(f"backward mode must be 'B' or 'BW', not {mode!r}")
        g = grad
        if g is None:  # the last stage: the weighted loss itself
            g = torch.ones_like(tape.output)
        for step in reversed(tape.steps):
            if isinstance(step, MoEBlockTape):
                g = yield from self._moe_backward(side, step, g, mode)
                continue
            with self._compute(side, step.name, step.layer):
                (g,) = step.backward([g], mode)
        if mode == "BW":
            tape.steps = []  # B keeps the steps: W still needs their output gradients
        return g

    def weights(self, tape: StageTape, params: list[nn.Parameter]) -> None:
        """W after a B pass: each compute sub-step's parameter gradients, no communication."""
        for step in tape.steps:
            for s in (
                [step.attn, step.shared, step.experts, step.finish]
                if isinstance(step, MoEBlockTape)
                else [step]
            ):
                if s is not None:
                    s.weights(params)
        tape.steps = []

    def _moe_backward(
        self, side: str, t: MoEBlockTape, g_out: torch.Tensor | None, mode: str
    ) -> Generator[None, None, torch.Tensor | None]:
        r, d, lid = t.route, t.dispatcher, t.layer
        with self._compute(side, "finish", lid):
            g_h1, g_back, g_shared = t.finish.backward([g_out], mode)
        back = t.finish.leaves[1]
        g_back = torch.zeros_like(back) if g_back is None else g_back  # every rank takes part, grad or not
        ex = self._issue(side, "combine", lid, [g_back], r.recv_splits, r.send_splits, d.group)
        yield
        g_flat = None
        if t.shared is not None:
            with self._compute(side, "shared", lid):
                (g_flat,) = t.shared.backward([g_shared], mode)
        yield  # the forward side finishes its plan and issues its dispatch before this side's next compute
        (g_partial,) = self._wait(side, "combine", lid, ex)
        # the routed experts' input gradients (B) first, so the dispatch's backward leaves as early as
        # possible; their weight gradients (W) then run under it, before the other side's routed experts
        with self._compute(side, "experts", lid):
            g_recv, g_meta = t.experts.backward([g_partial], "B")
        recv, recv_meta = t.experts.leaves
        g_recv = torch.zeros_like(recv) if g_recv is None else g_recv
        g_meta = torch.zeros_like(recv_meta) if g_meta is None else g_meta
        ex = self._issue(side, "dispatch", lid, [g_recv, g_meta], r.send_splits, r.recv_splits, d.group)
        if mode == "BW":
            with self._compute(side, "experts-W", lid):
                t.experts.weights(t.expert_params)
        yield
        g_send, g_send_meta = self._wait(side, "dispatch", lid, ex)
        with self._compute(side, "attn", lid):
            (g_h,) = t.attn.backward([g_h1, g_flat, g_send, g_send_meta], mode)
        return g_h


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

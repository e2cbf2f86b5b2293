"""One executor for every schedule: it walks a rank's action list and runs each action on its stage module.

Communication follows the rule in `schedules.py`: an action receives its input right before it runs and
sends its output right after (non-blocking `isend`, waited at the end of the step). Every message carries a
tag made of (direction, stage, micro-batch), so a receive matches its send whatever order the two ranks
post them in (DualPipe with pp ≥ 6 interleaves activations and gradients differently on the two sides of a
link). Shapes need no exchange: every rank reads the same global batch, so it knows each micro-batch's shape.

B and W are split by running autograd twice over the stage's retained graph: B asks only for the gradient of
the stage input (parameters' `.grad` stay untouched), W later only for the parameters. This is exact; it
costs a second traversal of the backward graph. FB runs its forward and then its backward.

With `overlap` (parallel.overlap) every action runs through the overlap engine (`parallel/overlap.py`):
stages are cut into sub-steps at each MoE block's all-to-alls, an FB runs its two halves interleaved so each
half's exchanges are in flight under the other half's compute, and B/W use the same cuts (W repeats no
communication). An FB receives both inputs before it starts and sends each half's output when that half
ends (the order `analysis.simulate` assumes for an FB). Loss values are read back once, at the end of the
step (a `.item()` per micro-batch would be a host sync in the middle of an FB pair).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ...model import MoEStats, Transformer
from ..overlap import OverlapEngine, StageTape, drain, pair
from .schedules import Action, Kind, Schedule
from .stages import StageView


def _tag(direction: int, stage: int, mb: int) -> int:
    return (direction * 1024 + stage) * 65536 + mb


@dataclass
class _Slot:
    """What a (stage, micro-batch) keeps between its forward and its backward."""

    x: torch.Tensor  # stage input (token ids on the first stage)
    roots: list[torch.Tensor]  # tensors to backpropagate from
    grads: list[torch.Tensor | None]  # their incoming gradients (None: filled from a receive)
    b_done: bool = False
    tape: StageTape | None = None  # the overlap engine's record of the forward (then roots = [output])


@dataclass
class StepOutput:
    sums: dict[str, float] = field(default_factory=dict)  # this rank's share of the weighted loss totals
    stats: MoEStats = field(default_factory=MoEStats)
    has_mtp: bool = False
    has_balance: bool = False
    # (key, weight, scalar tensor) terms of `sums`, read back together by `finish` (one host sync)
    pending: list[tuple[str, float, torch.Tensor]] = field(default_factory=list)

    def add(self, key: str, weight: float, value: torch.Tensor) -> None:
        self.pending.append((key, weight, value.detach()))

    def finish(self) -> StepOutput:
        if self.pending:
            values = torch.stack([v.float() for _, _, v in self.pending]).tolist()
            for (key, w, _), v in zip(self.pending, values, strict=True):
                self.sums[key] += w * v
            self.pending = []
        return self


class PipelineExecutor:
    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        stages: dict[int, Transformer | StageView],
        peers: list[int],
        group: Any,
        hidden_size: int,
        dtype: torch.dtype = torch.float32,
        overlap: bool | OverlapEngine = False,
    ) -> None:
        """rank: this rank's pipeline index; stages: stage id -> module for the stages it holds;
        peers[i]: global rank of pipeline rank i (for p2p); group: the pipeline process group;
        overlap: run actions through an overlap engine (True: a new one; or the engine to use)."""
        self.schedule, self.rank, self.stages = schedule, rank, stages
        self.peers, self.group = peers, group
        self.hidden, self.dtype = hidden_size, dtype
        self.engine: OverlapEngine | None = (
            overlap if isinstance(overlap, OverlapEngine) else OverlapEngine() if overlap else None
        )

    # ------------------------------------------------------------------------------------------- p2p
    def _send(self, t: torch.Tensor, to: int, tag: int, pending: list) -> None:
        op = dist.P2POp(dist.isend, t.contiguous(), self.peers[to], group=self.group, tag=tag)
        pending.extend(dist.batch_isend_irecv([op]))

    def _recv(self, shape: tuple[int, ...], frm: int, tag: int, device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=self.dtype, device=device)
        op = dist.P2POp(dist.irecv, buf, self.peers[frm], group=self.group, tag=tag)
        for work in dist.batch_isend_irecv([op]):
            work.wait()
        return buf

    # --------------------------------------------------------------------------------------- running
    def run(self, micro: list[torch.Tensor], weights: list[float], mtp_weight: float) -> StepOutput:
        """micro[m]: tokens [b, T+1] of micro-batch m; weights[m]: its share of the global batch."""
        out = StepOutput(sums={"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0})
        slots: dict[tuple[int, int], _Slot] = {}
        local_fwd: dict[tuple[int, int], torch.Tensor] = {}
        local_bwd: dict[tuple[int, int], torch.Tensor] = {}
        sends: list = []
        ctx = (micro, weights, mtp_weight, slots, local_fwd, local_bwd, sends, out)
        for action in self.schedule.ranks[self.rank]:
            if action.kind is Kind.FB and self.engine is not None:
                self._pair(action, ctx)
                continue
            for part in action.parts():
                self._run_part(part, ctx)
        for s in sends:
            s.wait()
        return out.finish()

    @torch.no_grad()
    def forward_only(self, micro: list[torch.Tensor], weights: list[float]) -> StepOutput:
        """Evaluation: every micro-batch forward through the first pipeline, no backward, no stash."""
        out = StepOutput(sums={"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0})
        sends: list = []
        ctx = (micro, weights, 0.0, {}, {}, {}, sends, out)
        mine = [s for s in self.schedule.pipelines[0] if self.schedule.rank_of(s) == self.rank]
        for mb in range(len(micro)):
            for stage in mine:
                self._forward(stage, mb, ctx, keep=False)
        for s in sends:
            s.wait()
        return out.finish()

    def _run_part(self, a: Action, ctx) -> None:
        if a.kind is Kind.F:
            self._forward(a.stage, a.mb, ctx)
        elif a.kind in (Kind.B, Kind.BW):
            self._backward(a.stage, a.mb, ctx, inputs_only=a.kind is Kind.B)
        elif a.kind is Kind.W:
            self._weights(a.stage, a.mb, ctx)
        else:  # FB parts are split by Action.parts()
            raise ValueError(f"cannot run {a}")

    def _forward(self, stage: int, mb: int, ctx, keep: bool = True) -> None:
        x = self._stage_input(stage, mb, ctx, keep)
        drain(self._forward_program(stage, mb, x, ctx, keep))

    def _stage_input(self, stage: int, mb: int, ctx, keep: bool) -> torch.Tensor:
        """Token ids on a pipeline's first stage; else the activation received (or handed over locally)."""
        micro, _, _, _, local_fwd, _, _, _ = ctx
        sch, module = self.schedule, self.stages[stage]
        device = next(module.parameters()).device
        tokens = micro[mb].to(device)
        if sch.is_first_stage(stage):
            return tokens[:, :-1]
        frm = sch.recv_forward_from(stage)
        shape = (tokens.shape[0], tokens.shape[1] - 1, self.hidden)
        x = local_fwd.pop((stage, mb)) if frm is None else self._recv(shape, frm, _tag(0, stage, mb), device)
        if keep:
            x.requires_grad_(True)
        return x

    def _forward_program(self, stage: int, mb: int, x: torch.Tensor, ctx, keep: bool):
        """The forward of (stage, mb) as a program (parallel/overlap.py) that sends its output at the end."""
        micro, weights, mtp_weight, slots, local_fwd, _, sends, out = ctx
        sch, module = self.schedule, self.stages[stage]
        labels = micro[mb][:, 1:].to(x.device)
        stats = MoEStats()
        w = weights[mb]
        last = sch.is_last_stage(stage)
        results = []

        def head(h: torch.Tensor) -> torch.Tensor:
            res = module.head(h, labels, stats)
            results.append(res)
            loss = res.lm_loss
            if res.mtp_loss is not None:
                loss = loss + mtp_weight * res.mtp_loss
            return loss * w

        tape = None
        if self.engine is not None and keep:
            ops = module.program(x, stats, head if last else None, phases=True)
            tape = yield from self.engine.forward(ops, x, stats, w)
            h = tape.output  # the weighted loss on the last stage
        elif last:
            results.append(module(x, labels, stats))
        else:
            h = module(x, None, stats)
        if last:
            res = results[0]
            loss = res.lm_loss
            out.add("lm_loss", w, res.lm_loss)
            if res.mtp_loss is not None:
                loss = loss + mtp_weight * res.mtp_loss
                out.add("mtp_loss", w, res.mtp_loss)
                out.has_mtp = True
            roots, grads = [h if tape is not None else loss * w], [None]
            out.add("loss", w, loss)
        else:
            to = sch.send_forward_to(stage)
            if to is not None:
                self._send(h.detach(), to, _tag(0, sch.next_stage(stage), mb), sends)
            else:
                local_fwd[(sch.next_stage(stage), mb)] = h.detach()
            roots, grads = [h], [None]  # the gradient arrives with the backward
        bal = stats.balance_loss()
        if bal is not None:
            if tape is None:  # the engine's sub-steps backpropagate their own balance terms
                roots.append(bal * w)
                grads.append(None)
            out.add("balance_loss", w, bal)
            out.add("loss", w, bal)
            out.has_balance = True
        for r in stats.records:
            r.balance_loss = None  # values were taken; keep only the counts beyond this point
        out.stats.records.extend(stats.records)
        if keep:
            slots[(stage, mb)] = _Slot(x, roots, grads, tape=tape)

    def _incoming_grad(self, stage: int, mb: int, slot: _Slot, ctx) -> None:
        _, _, _, _, _, local_bwd, _, _ = ctx
        sch = self.schedule
        if sch.is_last_stage(stage) or slot.grads[0] is not None:
            return
        frm = sch.recv_backward_from(stage)
        h = slot.roots[0]
        if frm is None:
            slot.grads[0] = local_bwd.pop((stage, mb))
        else:
            slot.grads[0] = self._recv(tuple(h.shape), frm, _tag(1, stage, mb), h.device)

    def _root_grads(self, slot: _Slot) -> list[torch.Tensor]:
        return [
            g if g is not None else torch.ones_like(r) for r, g in zip(slot.roots, slot.grads, strict=True)
        ]

    def _backward(self, stage: int, mb: int, ctx, inputs_only: bool) -> None:
        slots = ctx[3]
        slot = slots[(stage, mb)] if inputs_only else slots.pop((stage, mb))
        self._incoming_grad(stage, mb, slot, ctx)
        drain(self._backward_program(stage, mb, slot, inputs_only, ctx))

    def _backward_program(self, stage: int, mb: int, slot: _Slot, inputs_only: bool, ctx):
        """The backward of (stage, mb) as a program; it passes the input gradient back at the end."""
        _, _, _, _, _, local_bwd, sends, _ = ctx
        first = self.schedule.is_first_stage(stage)
        if slot.tape is not None:
            assert self.engine is not None
            mode = "B" if inputs_only else "BW"
            gx = yield from self.engine.backward(slot.tape, slot.grads[0], mode)
            slot.b_done = inputs_only
            if not first:
                self._pass_back(
                    stage, mb, gx if gx is not None else torch.zeros_like(slot.x), local_bwd, sends
                )
            return
        if inputs_only:
            if not first:
                (gx,) = torch.autograd.grad(slot.roots, [slot.x], self._root_grads(slot), retain_graph=True)
                self._pass_back(stage, mb, gx, local_bwd, sends)
            slot.b_done = True
            return
        torch.autograd.backward(slot.roots, self._root_grads(slot))
        if not first:
            self._pass_back(stage, mb, slot.x.grad, local_bwd, sends)

    def _pair(self, a: Action, ctx) -> None:
        """An FB with the overlap engine: both inputs received first, then the forward of one micro-batch and
        the full backward of another interleaved (`overlap.pair`)."""
        slots = ctx[3]
        f, b = a.parts()
        x = self._stage_input(f.stage, f.mb, ctx, keep=True)
        slot = slots.pop((b.stage, b.mb))
        self._incoming_grad(b.stage, b.mb, slot, ctx)
        pair(
            self._forward_program(f.stage, f.mb, x, ctx, keep=True),
            self._backward_program(b.stage, b.mb, slot, False, ctx),
        )

    def _weights(self, stage: int, mb: int, ctx) -> None:
        _, _, _, slots, _, _, _, _ = ctx
        slot = slots.pop((stage, mb))
        params = [p for p in self.stages[stage].parameters() if p.requires_grad]
        if slot.tape is not None:
            assert self.engine is not None
            self.engine.weights(slot.tape, params)
            return
        torch.autograd.backward(slot.roots, self._root_grads(slot), inputs=params)

    def _pass_back(self, stage: int, mb: int, gx: torch.Tensor, local_bwd: dict, sends: list) -> None:
        sch = self.schedule
        to = sch.send_backward_to(stage)
        prev = sch.prev_stage(stage)
        if to is not None:
            self._send(gx, to, _tag(1, prev, mb), sends)
        else:
            local_bwd[(prev, mb)] = gx

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

Every training step runs here, pp = 1 included (a one-stage schedule): the loss is composed by one function
(`model.loss.training_loss`) and backpropagated by one backward function (autograd, or an optimizer engine's
own, e.g. DeepSpeed's), whatever the schedule. Evaluation runs the same stage forwards without a backward.
A one-stage step may run each micro-batch from a CUDA graph of that same forward and backward (`graphed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ...model import MoEStats, Transformer
from ...model.documents import Documents, staged
from ...model.loss import training_loss
from ..overlap import OverlapEngine, StageTape, drain, pair, within
from .schedules import Action, Kind, Schedule
from .stages import StageView

if TYPE_CHECKING:
    from .graphed import GraphedMicroBatch

# backpropagate `tensors` with incoming gradients `grads` (torch.autograd.backward's signature)
Backward = Callable[[list[torch.Tensor], list[torch.Tensor]], None]
Segment = Callable[[torch.Tensor], "Documents | None"]  # input ids [b, T] -> their documents, or None
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")


def _tag(direction: int, stage: int, mb: int) -> int:
    return (direction * 1024 + stage) * 65536 + mb


@dataclass
class _Stash:
    """What a (stage, micro-batch) keeps between its forward and its backward."""

    x: torch.Tensor  # stage input (token ids on the first stage)
    roots: list[torch.Tensor]  # tensors to backpropagate from
    grads: list[torch.Tensor | None]  # their incoming gradients (None: filled from a receive)
    b_done: bool = False
    tape: StageTape | None = None  # the overlap engine's record of the forward (then roots = [output])


@dataclass
class StepOutput:
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_KEYS, 0.0))
    stats: MoEStats = field(default_factory=MoEStats)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # micro-batch -> its lm_loss_rows
    # (key, weight, scalar tensor) terms of `sums`, read back together by `finish` (one host sync)
    pending: list[tuple[str, float, torch.Tensor]] = field(default_factory=list)

    def add(self, key: str, weight: float, value: torch.Tensor) -> None:
        self.pending.append((key, weight, value.detach()))

    def finish(self, read: bool = True) -> StepOutput:
        """Sum the pending terms into `sums`: floats read back in one transfer, or (read=False) float64
        tensors left on the device, the same arithmetic without waiting for the step."""
        if self.pending:
            stacked = torch.stack([v.float() for _, _, v in self.pending])
            values = stacked.tolist() if read else stacked.double().unbind()
            for (key, w, _), v in zip(self.pending, values, strict=True):
                self.sums[key] = self.sums[key] + w * v
            self.pending = []
        return self


@dataclass
class _Run:
    """One step's state on this rank: its micro-batches and what actions hand each other."""

    micro: list[torch.Tensor]  # tokens [b, T+1] of each micro-batch
    weights: list[float]  # each micro-batch's share of the global batch
    mtp_weight: float
    out: StepOutput = field(default_factory=StepOutput)
    stash: dict[tuple[int, int], _Stash] = field(default_factory=dict)
    local_fwd: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # same-rank activations
    local_bwd: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # same-rank gradients
    sends: list = field(default_factory=list)  # p2p work to wait for at the end
    on_device: dict[int, torch.Tensor] = field(default_factory=dict)  # micro-batch -> its tokens, copied once
    segment: Segment = lambda tokens: None  # the executor's `documents`
    docs: dict[int, Documents | None] = field(default_factory=dict)  # micro-batch -> its documents, on device

    def tokens(self, mb: int, device: torch.device) -> torch.Tensor:
        """Micro-batch mb's tokens on `device`: one copy shared by its input ids and labels, and by every
        stage of this rank."""
        if mb not in self.on_device:
            self.on_device[mb] = self.micro[mb].to(device, non_blocking=True)
        return self.on_device[mb]

    def documents(self, mb: int, device: torch.device) -> Documents | None:
        """Micro-batch mb's documents, found in its input ids where they are (on the host, so without a
        device sync), then copied to `device` once for every stage of this rank."""
        if mb not in self.docs:
            found = self.segment(self.micro[mb][:, :-1])
            self.docs[mb] = None if found is None else found.to(device)
        return self.docs[mb]


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
        backward: Backward = torch.autograd.backward,
    ) -> None:
        """rank: this rank's pipeline index; stages: stage id -> module for the stages it holds;
        peers[i]: global rank of pipeline rank i (for p2p); group: the pipeline process group;
        overlap: run actions through an overlap engine (True: a new one; or the engine to use);
        backward: how a full backward (BW) of the plain path backpropagates its roots.
        `forward_context` (settable, like `backward_fn`): entered around each forward's own work and
        nothing else (`overlap.within`): the trainer's autocast, so backwards run outside it.
        `documents` (settable): a micro-batch's input ids -> their `Documents` (model/documents.py), or
        None for one causal sequence per row."""
        self.schedule, self.rank, self.stages = schedule, rank, stages
        self.peers, self.group = peers, group
        self.hidden, self.dtype = hidden_size, dtype
        self.engine: OverlapEngine | None = (
            overlap if isinstance(overlap, OverlapEngine) else OverlapEngine() if overlap else None
        )
        self.backward_fn = backward
        self.forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.documents: Segment = lambda tokens: None
        # settable: runs each micro-batch of a one-stage step from a CUDA graph (pipeline/graphed.py)
        self.graphed: GraphedMicroBatch | None = None

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
    def _staged(self, micro: list[torch.Tensor]) -> list[torch.Tensor]:
        """The micro-batches where their copies to this rank's device need not wait (`staged`)."""
        device = next(next(iter(self.stages.values())).parameters()).device
        return [staged(m, device) for m in micro]

    def run(
        self, micro: list[torch.Tensor], weights: list[float], mtp_weight: float, read: bool = True
    ) -> StepOutput:
        """micro[m]: tokens [b, T+1] of micro-batch m; weights[m]: its share of the global batch; read=False:
        the loss sums stay on the device (`StepOutput.finish`)."""
        run = _Run(self._staged(micro), weights, mtp_weight, segment=self.documents)
        if self.graphed is not None:  # the one-stage order: each micro-batch's forward, then its backward
            for mb in range(len(micro)):
                self.graphed(run, mb)
            return run.out.finish(read)
        for action in self.schedule.ranks[self.rank]:
            if action.kind is Kind.FB and self.engine is not None:
                self._pair(action, run)
                continue
            for part in action.parts():
                self._run_part(part, run)
        for s in run.sends:
            s.wait()
        return run.out.finish(read)

    @torch.no_grad()
    def forward_only(self, micro: list[torch.Tensor], weights: list[float]) -> StepOutput:
        """Evaluation: every micro-batch forward through the first pipeline, no backward, no stash."""
        run = _Run(self._staged(micro), weights, 0.0, segment=self.documents)
        mine = [s for s in self.schedule.pipelines[0] if self.schedule.rank_of(s) == self.rank]
        for mb in range(len(micro)):
            for stage in mine:
                self._forward(stage, mb, run, keep=False)
        for s in run.sends:
            s.wait()
        return run.out.finish()

    def _run_part(self, a: Action, run: _Run) -> None:
        if a.kind is Kind.F:
            self._forward(a.stage, a.mb, run)
        elif a.kind in (Kind.B, Kind.BW):
            self._backward(a.stage, a.mb, run, inputs_only=a.kind is Kind.B)
        elif a.kind is Kind.W:
            self._weights(a.stage, a.mb, run)
        else:  # FB parts are split by Action.parts()
            raise ValueError(f"cannot run {a}")

    def _forward(self, stage: int, mb: int, run: _Run, keep: bool = True) -> None:
        x = self._stage_input(stage, mb, run, keep)
        drain(within(self.forward_context, self._forward_program(stage, mb, x, run, keep)))

    def _stage_input(self, stage: int, mb: int, run: _Run, keep: bool) -> torch.Tensor:
        """Token ids on a pipeline's first stage; else the activation received (or handed over locally)."""
        sch, module = self.schedule, self.stages[stage]
        device = next(module.parameters()).device
        tokens = run.tokens(mb, device)
        if sch.is_first_stage(stage):
            return tokens[:, :-1]
        frm = sch.recv_forward_from(stage)
        shape = (tokens.shape[0], tokens.shape[1] - 1, self.hidden)
        x = (
            run.local_fwd.pop((stage, mb))
            if frm is None
            else self._recv(shape, frm, _tag(0, stage, mb), device)
        )
        if keep:
            x.requires_grad_(True)
        return x

    def _forward_program(self, stage: int, mb: int, x: torch.Tensor, run: _Run, keep: bool):
        """The forward of (stage, mb) as a program (parallel/overlap.py) that sends its output at the end."""
        sch, module = self.schedule, self.stages[stage]
        labels = run.tokens(mb, x.device)[:, 1:]
        docs = run.documents(mb, x.device)
        stats = MoEStats()
        w = run.weights[mb]
        last = sch.is_last_stage(stage)
        heads = []

        def head(h: torch.Tensor) -> torch.Tensor:
            """The head's weighted loss terms (the engine's sub-steps backpropagate the balance terms)."""
            heads.append(module.head(h, labels, stats, docs=docs))
            return training_loss(heads[0], None, run.mtp_weight).total * w

        tape = None
        if self.engine is not None and keep:
            ops = module.program(x, stats, head if last else None, phases=True, docs=docs)
            tape = yield from self.engine.forward(ops, x, stats, w)
            h = tape.output  # the weighted loss on the last stage
        elif last:
            heads.append(module(x, labels, stats, docs=docs))
        else:
            h = module(x, None, stats, docs=docs)
        terms = training_loss(heads[0] if last else None, stats, run.mtp_weight)
        if last and heads[0].lm_loss_rows is not None:
            run.out.rows[mb] = heads[0].lm_loss_rows
        for key, value in terms.parts.items():
            run.out.add(key, w, value)
        if terms.total is not None:
            run.out.add("loss", w, terms.total)
        if tape is not None:
            roots, grads = [h], [None]
        elif last:
            roots, grads = [terms.total * w], [None]
        else:
            roots, grads = [h], [None]  # the gradient arrives with the backward
            if "balance_loss" in terms.parts:
                roots.append(terms.parts["balance_loss"] * w)
                grads.append(None)
        if not last:
            to = sch.send_forward_to(stage)
            if to is not None:
                self._send(h.detach(), to, _tag(0, sch.next_stage(stage), mb), run.sends)
            else:
                run.local_fwd[(sch.next_stage(stage), mb)] = h.detach()
        for r in stats.records:
            r.balance_loss = None  # values were taken; keep only the counts beyond this point
        run.out.stats.records.extend(stats.records)
        if keep:
            run.stash[(stage, mb)] = _Stash(x, roots, grads, tape=tape)

    def _incoming_grad(self, stage: int, mb: int, st: _Stash, run: _Run) -> None:
        sch = self.schedule
        if sch.is_last_stage(stage) or st.grads[0] is not None:
            return
        frm = sch.recv_backward_from(stage)
        h = st.roots[0]
        if frm is None:
            st.grads[0] = run.local_bwd.pop((stage, mb))
        else:
            st.grads[0] = self._recv(tuple(h.shape), frm, _tag(1, stage, mb), h.device)

    def _root_grads(self, st: _Stash) -> list[torch.Tensor]:
        return [g if g is not None else torch.ones_like(r) for r, g in zip(st.roots, st.grads, strict=True)]

    def _backward(self, stage: int, mb: int, run: _Run, inputs_only: bool) -> None:
        st = run.stash[(stage, mb)] if inputs_only else run.stash.pop((stage, mb))
        self._incoming_grad(stage, mb, st, run)
        drain(self._backward_program(stage, mb, st, inputs_only, run))

    def _backward_program(self, stage: int, mb: int, st: _Stash, inputs_only: bool, run: _Run):
        """The backward of (stage, mb) as a program; it passes the input gradient back at the end."""
        first = self.schedule.is_first_stage(stage)
        if st.tape is not None:
            assert self.engine is not None
            mode = "B" if inputs_only else "BW"
            gx = yield from self.engine.backward(st.tape, st.grads[0], mode)
            st.b_done = inputs_only
            if not first:
                self._pass_back(stage, mb, gx if gx is not None else torch.zeros_like(st.x), run)
            return
        if inputs_only:
            if not first:
                (gx,) = torch.autograd.grad(st.roots, [st.x], self._root_grads(st), retain_graph=True)
                self._pass_back(stage, mb, gx, run)
            st.b_done = True
            return
        self.backward_fn(st.roots, self._root_grads(st))
        if not first:
            self._pass_back(stage, mb, st.x.grad, run)

    def _pair(self, a: Action, run: _Run) -> None:
        """An FB with the overlap engine: both inputs received first, then the forward of one micro-batch and
        the full backward of another interleaved (`overlap.pair`)."""
        f, b = a.parts()
        x = self._stage_input(f.stage, f.mb, run, keep=True)
        st = run.stash.pop((b.stage, b.mb))
        self._incoming_grad(b.stage, b.mb, st, run)
        pair(
            within(self.forward_context, self._forward_program(f.stage, f.mb, x, run, keep=True)),
            self._backward_program(b.stage, b.mb, st, False, run),
        )

    def _weights(self, stage: int, mb: int, run: _Run) -> None:
        st = run.stash.pop((stage, mb))
        params = [p for p in self.stages[stage].parameters() if p.requires_grad]
        if st.tape is not None:
            assert self.engine is not None
            self.engine.weights(st.tape, params)
            return
        torch.autograd.backward(st.roots, self._root_grads(st), inputs=params)

    def _pass_back(self, stage: int, mb: int, gx: torch.Tensor, run: _Run) -> None:
        sch = self.schedule
        to = sch.send_backward_to(stage)
        prev = sch.prev_stage(stage)
        if to is not None:
            self._send(gx, to, _tag(1, prev, mb), run.sends)
        else:
            run.local_bwd[(prev, mb)] = gx

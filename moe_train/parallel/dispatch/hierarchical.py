"""Hierarchical (node-aware) expert dispatch: cross the slow inter-node link once per token and node.

The flat all-to-all sends a token once to every *rank* holding one of its experts, so a token whose experts
sit on three GPUs of one remote node crosses InfiniBand three times. DeepSeek-V3 instead sends it once per
destination *node* and forwards it over NVLink inside that node. Per MoE layer, with an ep group of `nodes`
nodes × `local` ranks (ep rank = node · local + local index):

1. plan: stage-1 rows are the unique (token, destination node) pairs; each goes to the rank with the
   sender's local index on that node (inter-node group). With each row travel, per top-k slot, the global
   expert id and the gate weight (`slot_meta`). The receiver forms stage-2 rows: the unique (received row,
   owner rank on this node) pairs, sent over the intra-node group with the same metadata; the expert rank
   keeps the slots naming its experts. Each stage's row counts are exchanged first (one host sync per
   stage: split sizes size the buffers; stage 2's exchange also brings the slot counts per expert).
2. dispatch: stage 1 moves token rows between nodes, stage 2 forwards them inside the node; the expert
   rank expands each row to its valid slots, sorted by local expert (as the flat dispatcher does).
3. combine, in reverse: the expert rank sends each stage-2 row's partial sum (of its gate-weighted slots)
   back inside the node; the forwarding rank adds the partial sums of one stage-1 row (the intra-node
   reduction happens before the slow link), and one row per (token, node) crosses back; the source adds
   its nodes' sums.

With node-limited routing (experts form `n_group` groups, whole groups per node, `topk_group` groups per
token; see `mesh.check_expert_groups`) a token reaches at most `topk_group` nodes, so it crosses the slow
link at most `topk_group` times each way whatever its top-k.

Each row's slot metadata travels in the same hop as the row. As phases (model/dispatch.py): plan = the
stage-1 count exchange; dispatch = stage-1 hop, then (once it arrived) the stage-2 count exchange and hop;
combine = stage-2 hop back, the node's sum, stage-1 hop back.

`hierarchical_bounded` (`bounded_intra`) runs stage 2 in fixed-size blocks instead (bounded.py): no count
exchange and no host read inside the node, overflow flagged for the trainer's exact rerun; its blocks move
through symmetric memory with `parallel.dispatch_transport` (symm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...model.phases import Compute, Issue, Prepare, Program, Wait
from ..comm import A2AHop
from .bounded import bounded_route, bounded_slots, pack_blocks, rows_bound, slots_bound, sum_over_blocks
from .counters import CommCounters, row_bytes, sends_fp8
from .rows import (
    Route,
    Slots,
    expand_to_slots,
    meta_experts,
    route_finish,
    route_start,
    rows_with_meta,
    slot_meta,
    slot_sums,
    sum_over_route,
    unpack_for_experts,
)
from .symm import BlockTransport, SymmHop


@dataclass
class HierPlan:
    inter: Route  # stage 1: tokens → the same local rank on each destination node
    topk_idx: torch.Tensor
    per_rank: int  # experts per rank
    bounded: bool = False  # stage 2 in fixed-size blocks (`HierarchicalDispatcher.bounded_intra`)
    intra: Route | None = None  # stage 2: stage-1 rows → the expert owners on this node (once received)
    slots: Slots | None = None  # stage-2 rows expanded to this rank's expert slots


class HierarchicalDispatcher:
    """Two-stage dispatch over an ep group of `nodes` × `local` ranks (see the module docstring).

    `inter_group`: this rank's peers with the same local index, one per node (size `nodes`);
    `intra_group`: this rank's ep peers on its node (size `local`). Either may have size 1.
    """

    def __init__(
        self,
        inter_group: Any,
        intra_group: Any,
        nodes: int,
        local: int,
        node_rank: int,
        local_rank: int,
        counters: CommCounters | None = None,
        inter_peer_nodes: list[int] | None = None,
        intra_peer_nodes: list[int] | None = None,
        event_log: list[str] | None = None,
        fp8_rows: bool = False,
        bounded_intra: bool = False,
        bound: float | None = None,
        transport: BlockTransport | None = None,
    ) -> None:
        self.inter_group, self.intra_group = inter_group, intra_group
        self.transport = transport  # stage 2's fixed-size blocks through symmetric memory (symm.py)
        # bounded_intra: stage 2 in fixed-size blocks with no count exchange (bounded.py), `bound` sizing
        # them; `exact` (the trainer's overflow path) switches it back to the host-synced stage 2
        self.bounded_intra, self.bound, self.exact = bounded_intra, bound, False
        if bounded_intra and counters is None:
            counters = CommCounters()  # overflow flags must land somewhere
        self.fp8_rows = fp8_rows  # dispatch rows travel as FP8 tiles, in both stages (parallel/comm.py)
        self.nodes, self.local = nodes, local
        self.node_rank, self.local_rank = node_rank, local_rank
        self.ep = nodes * local
        self.counters = counters
        # node of each peer, for the byte counters (see parallel.dispatch.DISPATCHERS)
        self.inter_peer_nodes = inter_peer_nodes or list(range(nodes))
        self.intra_peer_nodes = intra_peer_nodes or [0] * local
        self.event_log = event_log

    def _hop(
        self,
        kind: str,
        stage: str,
        send: list[int],
        recv: list[int],
        rows: torch.Tensor,
        blocks: bool = False,
    ) -> A2AHop:
        """A hop of `stage` ("inter" | "intra"), added to the byte counters under the flat dispatcher's keys
        (so both compare on one run) and per-stage keys (`<kind>_stage_inter*`, `<kind>_stage_intra*`)
        that show which link each stage used (`rows`: one of the rows it moves). blocks: stage 2's
        fixed-size blocks, which move through the transport where there is one."""
        inter = stage == "inter"
        fp8 = sends_fp8(self.fp8_rows, kind, rows)
        if self.counters is not None:
            me, peer_nodes = (
                (self.node_rank, self.inter_peer_nodes) if inter else (self.local_rank, self.intra_peer_nodes)
            )
            size = row_bytes(rows, fp8)
            self.counters.add(kind, send, size, me, peer_nodes)
            self.counters.add(f"{kind}_stage_{stage}", send, size, me, peer_nodes)
        group = self.inter_group if inter else self.intra_group
        if blocks and self.transport is not None:
            return SymmHop(f"{kind}_{stage}", send, recv, group, self.event_log, fp8, self.transport)
        return A2AHop(f"{kind}_{stage}", send, recv, group, self.event_log, fp8)

    def plan(self, topk_idx: torch.Tensor, n_experts: int) -> Program:
        """Stage 1's count exchange (stage 2's waits for the rows' metadata, see `dispatch_wait`)."""
        per_rank = n_experts // self.ep

        def start(stream: Any) -> Any:
            return route_start(
                topk_idx // (per_rank * self.local), self.nodes, self.inter_group, stream=stream
            )

        inter = yield Prepare("counts_inter", start, route_finish)
        return HierPlan(inter, topk_idx, per_rank, bounded=self.bounded_intra and not self.exact)

    def dispatch_start(self, plan: HierPlan, x: torch.Tensor, topk_weight: torch.Tensor) -> Program:
        """Stage 1: one row per (token, destination node), with its slot metadata, to the same local rank
        there."""
        r = plan.inter

        def pack(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rows_with_meta(x, slot_meta(plan.topk_idx, w), r)

        send, meta = yield Compute("pack", pack, (x, topk_weight), join=True)
        return (yield Issue(self._hop("dispatch", "inter", r.send_splits, r.recv_splits, send), (send, meta)))

    def dispatch_wait(self, plan: HierPlan, handle: Any) -> Program:
        """Stage 2 once stage 1 arrived: each received row to the ranks of this node owning its slots (their
        count exchange first, which also brings the slot counts per expert); then the received rows,
        expanded to this rank's slots and sorted by local expert."""
        rows, meta = yield Wait(handle)
        per_rank = plan.per_rank
        per_node = per_rank * self.local
        experts = meta_experts(meta)  # index math on the received metadata: no gradient
        here = experts // per_node == self.node_rank
        node_expert = torch.where(here, experts - self.node_rank * per_node, -1)
        owner = torch.where(here, node_expert // per_rank, -1)
        first = (self.node_rank * self.local + self.local_rank) * per_rank
        if plan.bounded:
            return (yield from self._bounded_stage2(plan, rows, meta, owner, first))

        def start(stream: Any) -> Any:
            return route_start(owner, self.local, self.intra_group, node_expert, per_rank, True, stream)

        plan.intra = r = yield Prepare("counts_intra", start, route_finish)

        send, meta = yield Compute("forward", lambda x, m: rows_with_meta(x, m, r), (rows, meta))
        handle = yield Issue(self._hop("dispatch", "intra", r.send_splits, r.recv_splits, send), (send, meta))
        rows, meta = yield Wait(handle)

        def unpack(rows: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            plan.slots, expert_rows = unpack_for_experts(rows, meta, first, per_rank, r)
            return expert_rows, plan.slots.local_counts, plan.slots.gates

        return (yield Compute("unpack", unpack, (rows, meta), join=True))

    def _bounded_stage2(
        self, plan: HierPlan, rows: torch.Tensor, meta: torch.Tensor, owner: torch.Tensor, first: int
    ) -> Program:
        """Stage 2 in fixed-size blocks (bounded.py): `B` rows to each rank of the node, padding naming expert
        −1, no count exchange; the slots of this rank's experts sorted into a buffer of `C` rows. `B` counts
        every row that could arrive in stage 1 (nodes × this rank's tokens: equal on every rank)."""
        n, k = plan.topk_idx.shape
        block = rows_bound(self.nodes * n, k, self.local, self.bound)
        r, real, overflow = bounded_route(owner, self.local, block)
        assert self.counters is not None
        self.counters.note_overflow(overflow)
        plan.intra = r
        send, meta = yield Compute("forward", lambda x, m: pack_blocks(x, m, r, real), (rows, meta))
        hop = self._hop("dispatch", "intra", r.send_splits, r.recv_splits, send, blocks=True)
        handle = yield Issue(hop, (send, meta))
        rows, meta = yield Wait(handle)
        cap = slots_bound(rows.shape[0], k, plan.per_rank, n, self.bound)

        def unpack(rows: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            plan.slots, full = bounded_slots(meta, first, plan.per_rank, cap)
            self.counters.note_overflow(full)
            return expand_to_slots(rows, plan.slots), plan.slots.local_counts, plan.slots.gates

        return (yield Compute("unpack", unpack, (rows, meta), join=True))

    def combine_start(self, plan: HierPlan, y: torch.Tensor, gates: torch.Tensor | None = None) -> Program:
        """Each stage-2 row's sum over its (gate-weighted) slots, sent back inside the node."""
        r = plan.intra
        partial = yield Compute("sum", lambda y, g: slot_sums(y, plan.slots, g), (y, gates), join=True)
        hop = self._hop("combine", "intra", r.recv_splits, r.send_splits, partial, blocks=plan.bounded)
        return (yield Issue(hop, (partial,)))

    def combine_wait(self, plan: HierPlan, handle: Any) -> Program:
        """The partial sums of each stage-1 row added on its forwarding rank (the intra-node reduction
        happens before the slow link), one row per (token, node) back to its source, and each token's sum
        over its nodes."""
        (back,) = yield Wait(handle)
        reduce = sum_over_blocks if plan.bounded else sum_over_route
        node_sum = yield Compute("reduce", lambda b: reduce(b, plan.intra), (back,), join=True)
        r = plan.inter
        handle = yield Issue(
            self._hop("combine", "inter", r.recv_splits, r.send_splits, node_sum), (node_sum,)
        )
        (back,) = yield Wait(handle)
        return (yield Compute("sum", lambda b: sum_over_route(b, plan.inter), (back,), join=True))

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
3. combine, in reverse: the expert rank sends each stage-2 row's gate-weighted partial sum back inside the
   node; the forwarding rank adds the partial sums of one stage-1 row (the intra-node reduction happens
   before the slow link), and one row per (token, node) crosses back; the source adds its nodes' sums.

With node-limited routing (experts form `n_group` groups, whole groups per node, `topk_group` groups per
token; see `mesh.check_expert_groups`) a token reaches at most `topk_group` nodes, so it crosses the slow
link at most `topk_group` times each way whatever its top-k.

Like the flat dispatcher, every step is separately callable and returns a handle (`dispatch_start` →
`dispatch_forward` → `dispatch_wait`, `combine_start` → `combine_forward` → `combine_wait`), each exchange is
an autograd-aware start/wait pair, and collectives are issued in the same order on every rank: in the
backward pass the data path (stage 2, then stage 1) runs before the gate-weight path (stage 2, then 1),
because the stage-1 data exchange lists the stage-2 weights as `after`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...ops.gather import gather_rows
from ..comm import A2A, a2a_start, a2a_wait
from .counters import CommCounters
from .rows import (
    Route,
    Slots,
    expand_to_slots,
    meta_experts,
    receiver_slots,
    route,
    send_slot_meta,
    slot_meta,
    slot_weighted_sums,
    sum_over_route,
)


@dataclass
class HierPlan:
    n_tokens: int
    inter: Route  # stage 1: tokens → the same local rank on each destination node
    intra: Route  # stage 2: stage-1 rows → the expert owners on this node
    slots: Slots  # stage-2 rows expanded to this rank's expert slots

    @property
    def local_counts(self) -> torch.Tensor:
        return self.slots.local_counts


@dataclass
class HierPending:
    plan: HierPlan
    buf: torch.Tensor
    comm: A2A
    stage: str  # "inter" | "intra": the exchange in flight


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
    ) -> None:
        self.inter_group, self.intra_group = inter_group, intra_group
        self.nodes, self.local = nodes, local
        self.node_rank, self.local_rank = node_rank, local_rank
        self.ep = nodes * local
        self.counters = counters
        # node of each peer, for the byte counters (see parallel.dispatch.DISPATCHERS)
        self.inter_peer_nodes = inter_peer_nodes or list(range(nodes))
        self.intra_peer_nodes = intra_peer_nodes or [0] * local
        self.event_log = event_log

    def _count(self, kind: str, stage: str, splits: list[int], row_bytes: int) -> None:
        """Bytes under the flat dispatcher's keys (so both compare on one run), plus per-stage keys
        (`<kind>_stage_inter*`, `<kind>_stage_intra*`) that show which link each stage used."""
        if self.counters is None:
            return
        me, peer_nodes = (
            (self.node_rank, self.inter_peer_nodes)
            if stage == "inter"
            else (self.local_rank, self.intra_peer_nodes)
        )
        self.counters.add(kind, splits, row_bytes, me, peer_nodes)
        self.counters.add(f"{kind}_stage_{stage}", splits, row_bytes, me, peer_nodes)

    # ------------------------------------------------------------------------------------------- plan
    def plan(self, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int) -> HierPlan:
        """Two host syncs (one per stage's count exchange; stage 2's also brings the slot counts)."""
        per_rank = n_experts // self.ep
        per_node = per_rank * self.local
        inter = route(topk_idx // per_node, self.nodes, self.inter_group)
        meta1 = send_slot_meta(
            inter, slot_meta(topk_idx, topk_weight), self.inter_group, self.event_log, "weights_inter"
        )
        # stage 2: the slots on this node, by owner (local index) and node-local expert id
        experts = meta_experts(meta1)
        here = experts // per_node == self.node_rank
        node_expert = torch.where(here, experts - self.node_rank * per_node, -1)
        owner = torch.where(here, node_expert // per_rank, -1)
        intra = route(owner, self.local, self.intra_group, node_expert, per_rank, unheld=True)
        meta2 = send_slot_meta(intra, meta1, self.intra_group, self.event_log, "weights_intra")
        first = (self.node_rank * self.local + self.local_rank) * per_rank
        slots = receiver_slots(meta2, first, per_rank, intra.recv_slots, intra.recv_key_counts)
        return HierPlan(n_tokens=topk_idx.shape[0], inter=inter, intra=intra, slots=slots)

    # ------------------------------------------------------------------------------ dispatch (async)
    def dispatch_start(self, x: torch.Tensor, plan: HierPlan) -> HierPending:
        """Launch stage 1: one row per (token, destination node) to the same local rank there."""
        r = plan.inter
        send = gather_rows(x, r.pair_row, r.rows)
        comm = A2A(r.recv_splits, r.send_splits, self.inter_group, log=self.event_log, name="dispatch_inter")
        self._count("dispatch", "inter", r.send_splits, x.shape[-1] * x.element_size())
        # Backward order: this exchange (data, stage 1) before the stage-2 weights' (see module docstring).
        return HierPending(plan, a2a_start(send, comm, after=(plan.slots.weight,)), comm, "inter")

    def dispatch_forward(self, pending: HierPending) -> HierPending:
        """Wait for stage 1, launch stage 2: each received row to the ranks of this node owning its slots."""
        assert pending.stage == "inter", pending.stage
        rows = a2a_wait(pending.buf, pending.comm)
        r = pending.plan.intra
        send = gather_rows(rows, r.pair_row, r.rows)
        comm = A2A(r.recv_splits, r.send_splits, self.intra_group, log=self.event_log, name="dispatch_intra")
        self._count("dispatch", "intra", r.send_splits, rows.shape[-1] * rows.element_size())
        return HierPending(pending.plan, a2a_start(send, comm), comm, "intra")

    def dispatch_wait(self, pending: HierPending) -> torch.Tensor:
        """Received rows, expanded to their slots and sorted by local expert (runs stage 2 if needed)."""
        if pending.stage == "inter":
            pending = self.dispatch_forward(pending)
        return expand_to_slots(a2a_wait(pending.buf, pending.comm), pending.plan.slots)

    # ------------------------------------------------------------------------------- combine (async)
    def combine_start(self, y: torch.Tensor, plan: HierPlan) -> HierPending:
        """Each stage-2 row's gate-weighted sum over its slots, sent back inside the node."""
        r = plan.intra
        hidden = y.shape[-1]
        partial = slot_weighted_sums(y, plan.slots)
        comm = A2A(r.send_splits, r.recv_splits, self.intra_group, log=self.event_log, name="combine_intra")
        self._count("combine", "intra", r.recv_splits, hidden * y.element_size())
        return HierPending(plan, a2a_start(partial, comm), comm, "intra")

    def combine_forward(self, pending: HierPending) -> HierPending:
        """Wait for the intra-node partial sums, add those of each stage-1 row (the node's share of the
        token), and launch the one inter-node row per (token, node) back to its source."""
        assert pending.stage == "intra", pending.stage
        back = a2a_wait(pending.buf, pending.comm)
        r = pending.plan.intra
        node_sum = sum_over_route(back, r)
        r1 = pending.plan.inter
        comm = A2A(r1.send_splits, r1.recv_splits, self.inter_group, log=self.event_log, name="combine_inter")
        self._count("combine", "inter", r1.recv_splits, back.shape[-1] * back.element_size())
        return HierPending(pending.plan, a2a_start(node_sum, comm), comm, "inter")

    def combine_wait(self, pending: HierPending) -> torch.Tensor:
        """Sum of each token's per-node results (runs the inter-node step if needed)."""
        if pending.stage == "intra":
            pending = self.combine_forward(pending)
        back = a2a_wait(pending.buf, pending.comm)
        return sum_over_route(back, pending.plan.inter)

    # ------------------------------------------------------------------ the Dispatcher seam (blocking)
    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, HierPlan]:
        plan = self.plan(topk_idx, topk_weight, n_experts)
        return self.dispatch_wait(self.dispatch_start(x, plan)), plan.local_counts, plan

    def combine(self, y: torch.Tensor, plan: HierPlan) -> torch.Tensor:
        return self.combine_wait(self.combine_start(y, plan))

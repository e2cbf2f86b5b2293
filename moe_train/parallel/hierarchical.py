"""Hierarchical (node-aware) expert dispatch: cross the slow inter-node link once per token and node.

The flat all-to-all sends a token once to every *rank* holding one of its experts, so a token whose experts
sit on three GPUs of one remote node crosses InfiniBand three times. DeepSeek-V3 instead sends it once per
destination *node* and forwards it over NVLink inside that node. Per MoE layer, with an ep group of `nodes`
nodes × `local` ranks (ep rank = node · local + local index):

1. plan: stage-1 rows are the unique (token, destination node) pairs; each goes to the rank with the
   sender's local index on that node (inter-node group). With each row travel, per top-k slot, the
   node-local expert id (−1 for slots on other nodes) and the gate weight. The receiver forms stage-2 rows:
   the unique (received row, owner rank on this node) pairs, sent over the intra-node group with the
   rank-local expert id (−1 for other ranks' slots) and the gate weight. Row counts of both stages are
   exchanged first (host syncs: split sizes size the buffers).
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
import torch.distributed as dist

from ..model.gather import gather_rows
from .comm import A2A, a2a_start, a2a_wait, all_to_all_nograd, exchange_counts
from .dispatch import CommCounters, _inverse, expand_to_slots, receiver_slots, slot_weighted_sums
from .mesh import Mesh


@dataclass
class Route:
    """One stage's row movement: each unique (source row, peer) pair is one sent row, in (peer, row) order."""

    n_rows: int
    fan: int  # most peers one row can reach: min(peers, k)
    pair_row: torch.Tensor  # (P,) source row of each sent row
    pair_pos: torch.Tensor  # (P,) slot of each pair in the (row, fan) layout: row·fan + c
    row_slots: torch.Tensor  # (n_rows, fan) the sent row in each slot of a source row (0 where unused)
    row_mask: torch.Tensor  # (n_rows, fan) bool: slot used
    send_splits: list[int]
    recv_splits: list[int]


def route(owner: torch.Tensor, peers: int, group: Any) -> tuple[Route, torch.Tensor]:
    """Rows to send for `owner` (n, k): the peer holding each slot, −1 for none. Returns the route and
    each sent row's peer. One small all-to-all (the counts) and a host sync."""
    n, k = owner.shape
    dev = owner.device
    fan = min(peers, k)
    # slots held by no peer (−1) mark a spare row that is dropped: no boolean indexing, so no host sync
    owner = torch.where(owner >= 0, owner, peers)
    uses = torch.zeros((peers + 1) * n, dtype=torch.bool, device=dev)
    uses[(owner.t() * n + torch.arange(n, device=dev)).reshape(-1)] = True
    uses = uses.view(peers + 1, n)[:peers]
    pair_peer, pair_row = uses.nonzero(as_tuple=True)  # sorted by peer, then row
    send_counts = uses.sum(1)
    recv_counts = exchange_counts(send_counts, group)
    order = uses.long().cumsum(0) - 1  # slot c of a row = the peer's order among the row's peers
    pair_pos = pair_row * fan + order[pair_peer, pair_row]
    row_mask = torch.zeros(n * fan, dtype=torch.bool, device=dev).index_fill_(0, pair_pos, True)
    r = Route(
        n_rows=n,
        fan=fan,
        pair_row=pair_row,
        pair_pos=pair_pos,
        row_slots=_inverse(pair_pos, n * fan).view(n, fan),
        row_mask=row_mask.view(n, fan),
        send_splits=send_counts.tolist(),
        recv_splits=recv_counts.tolist(),
    )
    return r, pair_peer


def send_slot_meta(
    r: Route,
    pair_peer: torch.Tensor,
    owner: torch.Tensor,
    dest_id: torch.Tensor,
    weight: torch.Tensor,
    group: Any,
    log: list[str] | None = None,
    name: str = "weights",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange each sent row's per-slot expert id (in the receiver's numbering, −1 for slots held by
    another peer) and gate weight (0 there). The weights stay in the autograd graph: the router learns
    through them."""
    same = owner.index_select(0, r.pair_row) == pair_peer.unsqueeze(1)
    ids = torch.where(same, dest_id.index_select(0, r.pair_row), -1)
    w = gather_rows(weight, r.pair_row, r.row_slots, r.row_mask)
    w = torch.where(same, w, torch.zeros_like(w))
    recv_id = all_to_all_nograd(ids, r.recv_splits, r.send_splits, group)
    pending = A2A(r.recv_splits, r.send_splits, group, log=log, name=name)
    return recv_id, a2a_wait(a2a_start(w, pending), pending)


@dataclass
class HierPlan:
    n_tokens: int
    k: int
    inter: Route  # stage 1: tokens → the same local rank on each destination node
    intra: Route  # stage 2: stage-1 rows → the expert owners on this node
    recv_weight: torch.Tensor  # (R2, K) gate weight per stage-2 row and slot (0 for other ranks' slots)
    slot_order: torch.Tensor  # (M,) positions in the (row, slot) layout, sorted by local expert
    slot_row: torch.Tensor  # (M,) stage-2 row of each sorted slot
    slot_pos: torch.Tensor  # (R2, K) sorted position of each (row, slot) (0 where unused)
    slot_valid: torch.Tensor  # (R2, K) bool: the slot is one of this rank's experts
    local_counts: torch.Tensor  # (experts_per_rank,) rows per local expert


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
        # node of each peer, for the byte counters: from the groups' real ranks (see from_mesh)
        self.inter_peer_nodes = inter_peer_nodes or list(range(nodes))
        self.intra_peer_nodes = intra_peer_nodes or [0] * local
        self.event_log = event_log

    @classmethod
    def from_mesh(
        cls, mesh: Mesh, counters: CommCounters | None = None, event_log: list[str] | None = None
    ) -> HierarchicalDispatcher:
        nodes, local = mesh.layout.ep_node_shape()
        inter, intra = mesh.group("inter_node"), mesh.group("intra_node")
        return cls(
            inter,
            intra,
            nodes,
            local,
            mesh.ep_node_rank,
            mesh.local_ep_rank,
            counters,
            [mesh.layout.node_of(r) for r in dist.get_process_group_ranks(inter)],
            [mesh.layout.node_of(r) for r in dist.get_process_group_ranks(intra)],
            event_log,
        )

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
        n, k = topk_idx.shape
        per_rank = n_experts // self.ep
        per_node = per_rank * self.local
        node = topk_idx // per_node
        inter, inter_peer = route(node, self.nodes, self.inter_group)
        id1, w1 = send_slot_meta(
            inter,
            inter_peer,
            node,
            topk_idx - node * per_node,
            topk_weight,
            self.inter_group,
            self.event_log,
            "weights_inter",
        )
        owner = torch.where(id1 >= 0, id1 // per_rank, -1)
        intra, intra_peer = route(owner, self.local, self.intra_group)
        id2, w2 = send_slot_meta(
            intra,
            intra_peer,
            owner,
            id1 - owner * per_rank,
            w1,
            self.intra_group,
            self.event_log,
            "weights_intra",
        )

        return HierPlan(
            n_tokens=n,
            k=k,
            inter=inter,
            intra=intra,
            recv_weight=w2,
            **receiver_slots(id2, per_rank),
        )

    # ------------------------------------------------------------------------------ dispatch (async)
    def dispatch_start(self, x: torch.Tensor, plan: HierPlan) -> HierPending:
        """Launch stage 1: one row per (token, destination node) to the same local rank there."""
        r = plan.inter
        send = gather_rows(x, r.pair_row, r.row_slots, r.row_mask)
        comm = A2A(r.recv_splits, r.send_splits, self.inter_group, log=self.event_log, name="dispatch_inter")
        self._count("dispatch", "inter", r.send_splits, x.shape[-1] * x.element_size())
        # Backward order: this exchange (data, stage 1) before the stage-2 weights' (see module docstring).
        return HierPending(plan, a2a_start(send, comm, after=(plan.recv_weight,)), comm, "inter")

    def dispatch_forward(self, pending: HierPending) -> HierPending:
        """Wait for stage 1, launch stage 2: each received row to the ranks of this node owning its slots."""
        assert pending.stage == "inter", pending.stage
        rows = a2a_wait(pending.buf, pending.comm)
        r = pending.plan.intra
        send = gather_rows(rows, r.pair_row, r.row_slots, r.row_mask)
        comm = A2A(r.recv_splits, r.send_splits, self.intra_group, log=self.event_log, name="dispatch_intra")
        self._count("dispatch", "intra", r.send_splits, rows.shape[-1] * rows.element_size())
        return HierPending(pending.plan, a2a_start(send, comm), comm, "intra")

    def dispatch_wait(self, pending: HierPending) -> torch.Tensor:
        """Received rows, expanded to their slots and sorted by local expert (runs stage 2 if needed)."""
        if pending.stage == "inter":
            pending = self.dispatch_forward(pending)
        return expand_to_slots(a2a_wait(pending.buf, pending.comm), pending.plan)

    # ------------------------------------------------------------------------------- combine (async)
    def combine_start(self, y: torch.Tensor, plan: HierPlan) -> HierPending:
        """Each stage-2 row's gate-weighted sum over its slots, sent back inside the node."""
        r = plan.intra
        hidden = y.shape[-1]
        partial = slot_weighted_sums(y, plan)
        comm = A2A(r.send_splits, r.recv_splits, self.intra_group, log=self.event_log, name="combine_intra")
        self._count("combine", "intra", r.recv_splits, hidden * y.element_size())
        return HierPending(plan, a2a_start(partial, comm), comm, "intra")

    def combine_forward(self, pending: HierPending) -> HierPending:
        """Wait for the intra-node partial sums, add those of each stage-1 row (the node's share of the
        token), and launch the one inter-node row per (token, node) back to its source."""
        assert pending.stage == "intra", pending.stage
        back = a2a_wait(pending.buf, pending.comm)
        r = pending.plan.intra
        node_sum = _sum_slots(back, r)
        r1 = pending.plan.inter
        comm = A2A(r1.send_splits, r1.recv_splits, self.inter_group, log=self.event_log, name="combine_inter")
        self._count("combine", "inter", r1.recv_splits, back.shape[-1] * back.element_size())
        return HierPending(pending.plan, a2a_start(node_sum, comm), comm, "inter")

    def combine_wait(self, pending: HierPending) -> torch.Tensor:
        """Sum of each token's per-node results (runs the inter-node step if needed)."""
        if pending.stage == "intra":
            pending = self.combine_forward(pending)
        back = a2a_wait(pending.buf, pending.comm)
        return _sum_slots(back, pending.plan.inter)

    # ------------------------------------------------------------------ the Dispatcher seam (blocking)
    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, HierPlan]:
        plan = self.plan(topk_idx, topk_weight, n_experts)
        return self.dispatch_wait(self.dispatch_start(x, plan)), plan.local_counts, plan

    def combine(self, y: torch.Tensor, plan: HierPlan) -> torch.Tensor:
        return self.combine_wait(self.combine_start(y, plan))


def _sum_slots(back: torch.Tensor, r: Route) -> torch.Tensor:
    """Rows returned along route `r` → one row per source row: the sum over its peers, in peer order."""
    hidden = back.shape[-1]
    per_slot = gather_rows(back, r.row_slots.reshape(-1), r.pair_pos.view(-1, 1)).view(
        r.n_rows, r.fan, hidden
    )
    return (per_slot * r.row_mask.unsqueeze(-1).to(back.dtype)).sum(1)

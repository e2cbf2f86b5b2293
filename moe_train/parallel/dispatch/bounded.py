"""Sync-free expert dispatch: fixed-size buffers, and split sizes that never leave the device.

The flat dispatcher (flat.py) reads its split sizes on the host before any row moves: one stall per MoE
layer and a host-built plan, which also keeps the layer out of CUDA graphs. This one sizes every buffer from
the number of tokens alone, so the host issues a MoE layer without reading anything back:

- Each rank sends every peer a block of exactly `B` rows (its rows for that peer in token order, then
  padding), and receives `B` from each: an all-to-all with equal splits. A token goes to a peer at most
  once, so `B` = the tokens this rank sends (`parallel.dispatch_bound=null`) can never overflow.
- Each row carries its slot metadata (global expert ids, gate weights). Padding rows carry expert id −1,
  so the receiver tells real rows from padding by the metadata alone: no count exchange at all.
- The receiver sorts the slots of its own experts by expert into a buffer of `C` rows plus one padding row,
  counts rows per expert on the device, and the grouped GEMM computes only the counted rows. `C` is the
  worst case (every received row with `min(k, experts per rank)` slots here) or `dispatch_bound` times the
  balanced load (k slots per token).
- Combine is the reverse: each received row's sum over its slots (the experts weighed them by their gates)
  goes back in its block position, and the sender adds a token's partial sums over its peers, in peer
  order.

The padding rows of the send blocks are copies of the rank's last token (gather_rows' inverse map then
covers every position) whose gradient comes back as exact zeros; the receiver's padding entries are
`Bags.pad` positions, excluded from sums and gradients. A real row or slot is therefore handled in the same
order, with the same sums, as by the flat dispatcher.

Overflow (`dispatch_bound` set, and a peer's rows beyond `B` or a rank's slots beyond `C`) is never dropped
silently: the layer raises a device flag in `CommCounters`, the trainer reads the flags of the step once it
ends, drops the step's gradients and runs the step again with every bounded dispatcher on its exact path
(`exact`: the flat dispatcher's plan, which reads the split sizes on the host). The result equals a run
with no bound; the record counts the steps redone.

Every rank of the ep group must pass the same number of tokens per call (the trainer's micro-batches are
equal on every rank): `B` is derived from it on each rank, and the all-to-all needs equal blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...model.phases import Compute, Issue, Program, Wait
from ...ops.fp8 import packed_row_bytes
from ...ops.gather import Bags, bag_sum, sort_keys
from ..comm import A2AHop
from .board import Board
from .counters import CommCounters, row_bytes, sends_fp8
from .flat import AllToAllDispatcher, FlatPlan
from .rows import Route, Slots, expand_to_slots, meta_experts, rows_with_meta, slot_meta, slot_sums
from .symm import BlockTransport, SymmHop, held_bytes


def rows_bound(tokens: int, k: int, peers: int, bound: float | None) -> int:
    """B, the rows each peer's block holds: every token (never overflows) or `bound` times the balanced
    share of a token's k slots, at least 1."""
    if bound is None:
        return max(1, tokens)
    return max(1, min(tokens, math.ceil(bound * tokens * k / peers)))


def slots_bound(received: int, k: int, per_rank: int, tokens: int, bound: float | None) -> int:
    """C, the expert-sorted slots a rank holds: the most its received rows can name, or `bound` times the
    balanced load (k slots per token sent by a rank), at least 1."""
    worst = max(1, received * min(k, per_rank))
    return worst if bound is None else max(1, min(worst, math.ceil(bound * tokens * k)))


def bounded_memory(
    tokens: int,
    hidden: int,
    k: int,
    per_rank: int,
    peers: int,
    bound: float | None,
    act_bytes: int,
    arriving: int | None = None,
    transport: str = "alltoall",
    fp8_rows: bool = False,
) -> tuple[float, int]:
    """For the memory estimate, a MoE layer over `tokens` tokens of this rank whose bounded exchange has
    `peers` ranks and at most `arriving` rows to send (this rank's tokens; nodes × them for the hierarchical
    dispatcher's intra-node stage): the expert rows it keeps per token (the slot buffer, `C + 1` rows, where
    a token's k slots would be kept without fixed sizes), and the bytes of its send and receive blocks with
    their slot metadata (fp32 ids and weights), each way, plus the symmetric buffers a `transport` holds for
    those blocks (and for FP8 rows' packed bytes, `fp8_rows`)."""
    block = rows_bound(tokens if arriving is None else arriving, k, peers, bound)
    cap = slots_bound(peers * block, k, per_rank, tokens, bound)
    blocks = 2 * peers * block * (hidden * act_bytes + 2 * k * 4)  # sent and received, rows and metadata
    shapes = {(peers * block, hidden * act_bytes), (peers * block, 2 * k * 4)}  # rows (both ways), metadata
    if fp8_rows:
        shapes.add((peers * block, packed_row_bytes(hidden)))
    return (cap + 1) / max(1, tokens), blocks + held_bytes(transport, shapes)


def bounded_route(owner: torch.Tensor, peers: int, block: int) -> tuple[Route, torch.Tensor, torch.Tensor]:
    """Send positions for `owner` (n, k), the peer of each slot (−1: held by no peer, not sent): peer p's
    rows fill positions p·block … in row order and padding fills the rest; no host read.

    Returns the route (`pair_row` = the source row of each of the peers·block positions, padding copying
    the last row; `rows` = each source row's positions in peer order, the last row's bag ending with the
    padding positions), a (peers·block,) bool of real positions, and a device flag: some peer had more rows
    than `block` (the rows past it are left out, and the caller must not use the result)."""
    n, dev = owner.shape[0], owner.device
    size = peers * block
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        bags = Bags(empty, torch.zeros(1, dtype=torch.long, device=dev), empty)
        splits = [block] * peers
        route = Route(0, torch.zeros(size, dtype=torch.long, device=dev), empty, bags, splits, splits)
        none = torch.zeros((), dtype=torch.bool, device=dev)
        return route, torch.zeros(size, dtype=torch.bool, device=dev), none
    owner = torch.where(owner >= 0, owner, peers)  # unheld slots mark a spare row, dropped
    uses = torch.zeros(peers + 1, n, dtype=torch.bool, device=dev).scatter_(0, owner.t(), True)[:peers]
    place = uses.long().cumsum(1) - 1  # each row's place in its peer's block
    kept = uses & (place < block)
    overflow = (uses.sum(1) > block).any()
    base = torch.arange(peers, device=dev).unsqueeze(1) * block
    target = torch.where(kept, base + place, size).view(-1)  # position `size`: a dump for the rest
    rows = torch.arange(n, device=dev).expand(peers, n).reshape(-1)
    pair_row = torch.full((size + 1,), n - 1, dtype=torch.long, device=dev).scatter_(0, target, rows)[:size]
    real = torch.zeros(size + 1, dtype=torch.bool, device=dev).scatter_(0, target, kept.view(-1))[:size]
    peer = torch.arange(size, device=dev) // block
    key = pair_row * (peers + 1) + torch.where(real, peer, peers)  # padding sorts after the last row's peers
    index = torch.argsort(key, stable=True)
    per_row = torch.zeros(n, dtype=torch.long, device=dev).scatter_add_(
        0, pair_row, torch.ones_like(pair_row)
    )
    offsets = torch.zeros(n + 1, dtype=torch.long, device=dev)
    torch.cumsum(per_row, 0, out=offsets[1:])
    splits = [block] * peers
    bags = Bags(index, offsets, pair_row.index_select(0, index))
    return Route(n, pair_row, peer, bags, splits, splits), real, overflow


def bounded_slots(
    meta: torch.Tensor, first_expert: int, per_rank: int, cap: int
) -> tuple[Slots, torch.Tensor]:
    """The received slots naming one of this rank's experts, sorted by expert (ties in (row, k) order) into
    `cap` rows plus one padding row; rows per expert counted on the device. Padding rows (expert id −1)
    name no expert. Returns the slots and a device flag: more than `cap` slots (those past it are left out).

    The bags are fixed: k entries per received row, its slots' sorted positions and `pad` (= cap) for the
    others."""
    rows, k = meta.shape[0], meta.shape[1] // 2
    dev = meta.device
    experts = meta_experts(meta)
    valid = (experts // per_rank == first_expert // per_rank) & (experts >= 0)
    key = torch.where(valid, experts - first_expert, per_rank).view(-1)
    order = sort_keys(key, per_rank)
    counts = torch.zeros(per_rank + 1, dtype=torch.long, device=dev).scatter_add_(
        0, key, torch.ones_like(key)
    )
    counts = counts[:per_rank]
    m = counts.sum()
    cap = min(cap, rows * k)
    # past `cap`, the last experts' counts shrink so that the grouped GEMM stays inside the buffer
    ends = counts.cumsum(0).clamp(max=cap)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    sorted_at = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=dev))
    entry = torch.where(valid.view(-1) & (sorted_at < cap), sorted_at, cap)
    slot_order = order[:cap]
    pad_row = torch.zeros(1, dtype=torch.long, device=dev)
    slot_row = torch.cat([slot_order // k, pad_row])
    in_use = torch.arange(cap, device=dev) < m
    gates = torch.where(in_use, meta[:, k:].reshape(-1).index_select(0, slot_order), 0.0)
    slots = Slots(
        slot_row=slot_row,
        rows=Bags(
            entry, torch.arange(rows + 1, device=dev) * k, torch.arange(rows * k, device=dev) // k, pad=cap
        ),
        gates=torch.cat([gates, gates.new_zeros(1)]),  # unused slots and the padding row weigh 0
        local_counts=counts,
    )
    return slots, m > cap


@dataclass
class BoundedPlan:
    """One layer call: the send blocks' route, its real positions, and the receiver's slots once arrived."""

    route: Route
    real: torch.Tensor
    topk_idx: torch.Tensor
    per_rank: int
    slots: Slots | None = None


def sum_over_blocks(back: torch.Tensor, r: Route) -> torch.Tensor:
    """Rows returned in a bounded route's blocks -> one row per source row, the sum over its peers in peer
    order (padding positions hold exact zeros)."""
    if r.n_rows == 0:
        return back[:0] * 1
    return bag_sum(back, r.rows, r.pair_row)


def pack_blocks(
    x: torch.Tensor, meta: torch.Tensor, r: Route, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and slot metadata of a bounded route's blocks; padding rows name expert −1."""
    rows, meta = rows_with_meta(x, meta, r)
    k = meta.shape[1] // 2
    experts = torch.where(real.unsqueeze(1), meta[:, :k].detach(), -1.0)
    return rows, torch.cat([experts, meta[:, k:]], dim=1)


class BoundedDispatcher(AllToAllDispatcher):
    """Flat expert dispatch with fixed-size blocks (module docstring); `exact` switches it to the flat
    dispatcher's host-synced phases (the trainer's path for a step whose bounded buffers overflowed)."""

    def __init__(
        self,
        group: Any,
        ep: int,
        ep_rank: int,
        counters: CommCounters | None = None,
        peer_nodes: list[int] | None = None,
        event_log: list[str] | None = None,
        fp8_rows: bool = False,
        bound: float | None = None,
        transport: BlockTransport | Board | None = None,
    ) -> None:
        counters = CommCounters() if counters is None else counters  # overflow flags must land somewhere
        super().__init__(group, ep, ep_rank, counters, peer_nodes, event_log, fp8_rows)
        self.counters: CommCounters = counters
        self.bound, self.exact = bound, False
        # how the blocks move (symm.py; None: the all-to-all with equal splits), or the direct dispatcher's
        # board (board.py), which replaces its blocks
        self.transport = transport

    def _block_hop(self, name: str, block: int, rows: torch.Tensor) -> A2AHop:
        """An equal-splits hop of `block` rows per peer, added to the byte counters (what the wire carries,
        padding included)."""
        fp8 = sends_fp8(self.fp8_rows, name, rows)
        splits = [block] * self.ep
        self.counters.add(name, splits, row_bytes(rows, fp8), self.ep_rank, self.peer_nodes)
        if self.transport is not None:
            return SymmHop(name, splits, splits, self.group, self.event_log, fp8, self.transport)
        return A2AHop(name, splits, splits, self.group, self.event_log, fp8)

    def plan(self, topk_idx: torch.Tensor, n_experts: int) -> Program:
        """Where each (token, peer) row sits in the send blocks: device work only."""
        if self.exact:
            return (yield from super().plan(topk_idx, n_experts))
        per_rank = n_experts // self.ep
        block = rows_bound(topk_idx.shape[0], topk_idx.shape[1], self.ep, self.bound)

        def place(topk_idx: torch.Tensor) -> BoundedPlan:
            route, real, overflow = bounded_route(topk_idx // per_rank, self.ep, block)
            self.counters.note_overflow(overflow)
            return BoundedPlan(route, real, topk_idx, per_rank)

        return (yield Compute("place", place, (topk_idx,), join=True))

    def dispatch_start(self, plan: Any, x: torch.Tensor, topk_weight: torch.Tensor) -> Program:
        """Each peer's block of rows and their slot metadata leave in one hop; padding names no expert."""
        if isinstance(plan, FlatPlan):
            return (yield from super().dispatch_start(plan, x, topk_weight))
        r = plan.route

        def pack(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return pack_blocks(x, slot_meta(plan.topk_idx, w), r, plan.real)

        send, meta = yield Compute("pack", pack, (x, topk_weight), join=True)
        return (yield Issue(self._block_hop("dispatch", r.send_splits[0], send), (send, meta)))

    def dispatch_wait(self, plan: Any, handle: Any) -> Program:
        """Received blocks -> the slots of this rank's experts, sorted by expert in a fixed-size buffer."""
        if isinstance(plan, FlatPlan):
            return (yield from super().dispatch_wait(plan, handle))
        rows, meta = yield Wait(handle)
        per, k = plan.per_rank, plan.topk_idx.shape[1]
        cap = slots_bound(rows.shape[0], k, per, plan.route.n_rows, self.bound)

        def unpack(rows: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            plan.slots, overflow = bounded_slots(meta, self.ep_rank * per, per, cap)
            self.counters.note_overflow(overflow)
            return expand_to_slots(rows, plan.slots), plan.slots.local_counts, plan.slots.gates

        return (yield Compute("unpack", unpack, (rows, meta), join=True))

    def combine_start(self, plan: Any, y: torch.Tensor, gates: torch.Tensor | None = None) -> Program:
        """Each received row's sum over its slots (gate-weighted by the experts) goes back to its block
        position."""
        if isinstance(plan, FlatPlan):
            return (yield from super().combine_start(plan, y, gates))
        partial = yield Compute("sum", lambda y, g: slot_sums(y, plan.slots, g), (y, gates), join=True)
        return (yield Issue(self._block_hop("combine", plan.route.send_splits[0], partial), (partial,)))

    def combine_wait(self, plan: Any, handle: Any) -> Program:
        """Each token's sum of its peers' partial results (padding positions hold exact zeros)."""
        if isinstance(plan, FlatPlan):
            return (yield from super().combine_wait(plan, handle))
        (back,) = yield Wait(handle)
        return (yield Compute("sum", lambda b: sum_over_blocks(b, plan.route), (back,), join=True))

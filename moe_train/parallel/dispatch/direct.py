"""Direct placement (`parallel.dispatcher=direct`): every slot's row goes straight to its place in the
owner's expert-sorted buffer, and every expert row straight back to its slot; nothing is read on the host.

The bounded dispatcher (bounded.py) sends one row per (token, peer) and the receiver expands it to its slots
and sorts them; combine sums each row's slots there and the sender adds its peers' sums. Each of those is a
pass over the rows of its own. Here the sender knows each slot's final place, so a row is written once on its
way in and read once on its way out — the two passes over the N·k rows that the local dispatcher makes:

1. plan (device only): each rank counts its slots per expert, and one fixed-size exchange (a sum of the
   (ranks, experts) table, each rank filling its row) gives every rank every rank's counts C[r, e]. An owner
   lays its experts out in order, expert e's rows by source rank, then in (token, k) order; so a slot of rank
   r for expert e sits at start(e) + Σ_{r' < r} C[r', e] + its rank among r's slots for e. Rows per local
   expert for the grouped GEMM are Σ_r C[r, e], known without a host read.
2. dispatch: the slot rows, with their places and gates, leave in fixed blocks of `B` rows per peer (each
   block's last row always padding, place −1); the receiver puts each row at its place in a buffer of `C`
   rows plus a padding row. This is the reference twin (equal-split all-to-all, gloo and NCCL), whose extra
   placement pass a symmetric-memory transport removes by storing the rows at their places in the peer's
   buffer.
3. combine: each received slot gets its expert's row back in its block position, and the sender sums a
   token's k rows in k order, in fp32 — the order one process sums them in, so no per-rank partial sum is
   rounded (the bounded and flat dispatchers round one per rank). Rows come back per slot, so combine moves
   up to k rows per token where those move one per (token, peer).

`B` and `C` are worst cases (a peer gets all of a rank's slots; a rank gets all slots of every rank), or
`parallel.dispatch_bound` times the balanced load. Overflow is never dropped silently: a device flag, the step
redone on the exact (flat) path, as the bounded dispatcher does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ...model.dispatch import expert_counts
from ...model.phases import Compute, Issue, Program, Wait
from ...ops.gather import Bags, bag_sum, gather_rows, sort_keys
from .bounded import BoundedDispatcher
from .flat import FlatPlan


def slot_block(tokens: int, k: int, per_rank: int, peers: int, bound: float | None) -> int:
    """B, the rows of each peer's block: every slot a rank may send one peer (its tokens times the slots a
    token can have there), or `bound` times the balanced share; plus the block's padding row."""
    worst = max(1, tokens * min(k, per_rank))
    rows = worst if bound is None else max(1, min(worst, math.ceil(bound * tokens * k / peers)))
    return rows + 1


def slot_capacity(tokens: int, k: int, per_rank: int, peers: int, bound: float | None) -> int:
    """C, the buffer rows of a rank's experts: every slot any rank may send it, or `bound` times the balanced
    load (each rank's tokens times k over the ranks, from every rank)."""
    worst = max(1, peers * tokens * min(k, per_rank))
    return worst if bound is None else max(1, min(worst, math.ceil(bound * tokens * k)))


def direct_memory(
    tokens: int, hidden: int, k: int, per_rank: int, peers: int, bound: float | None, act_bytes: int
) -> tuple[float, int]:
    """For the memory estimate: the expert rows kept per token (the buffer, C + 1 rows) and the bytes of the
    send and receive blocks with their places and gates (fp32), each way."""
    block = slot_block(tokens, k, per_rank, peers, bound)
    cap = slot_capacity(tokens, k, per_rank, peers, bound)
    return (cap + 1) / max(1, tokens), 2 * 2 * peers * block * (hidden * act_bytes + 2 * 4)


@dataclass
class DirectPlan:
    """One layer call's slot places, send blocks and (once received) the receiver's buffer map."""

    topk_idx: torch.Tensor
    per_rank: int
    block: int  # B
    cap: int  # C
    send_token: torch.Tensor  # (peers·B,) the token each send row copies (padding: the last token)
    send_slot: torch.Tensor  # (peers·B,) its (token, k) slot, n·k for padding
    send_place: torch.Tensor  # (peers·B,) its place in the owner's buffer, −1 for padding
    slots: Bags  # bag t = token t's k send rows (padding position for a slot left out by overflow)
    local_counts: torch.Tensor  # (per_rank,) rows of each local expert in this rank's buffer
    weight: torch.Tensor | None = None  # (n, k) the gates, once dispatched (the combine may weigh with them)
    arrived: Arrived | None = None  # the receiver's map, once the rows arrived
    weigh: bool = False  # the combine weighs (the experts did not)


@dataclass
class Arrived:
    """The receiver's map between received rows (padding rows among them) and its buffer of C + 1 rows."""

    place: torch.Tensor  # (peers·B,) each received row's buffer row (C, the padding row, for none)
    at: torch.Tensor  # (C + 1,) the received row at each buffer row (an always-padding row where none)
    filled: torch.Tensor  # (C + 1,) buffer rows holding a received row
    to_buffer: Bags  # bag q = received row q's buffer row (`pad` C for none): the placing gather's inverse
    to_rows: Bags  # bag j = buffer row j's received row (`pad` for none): the return gather's inverse


def _all_counts(counts: torch.Tensor, peers: int, me: int, group: Any) -> torch.Tensor:
    """(peers, E): every rank's slot counts per expert — a sum of a table in which each rank fills its own
    row: a fixed-size exchange, nothing read on the host."""
    table = counts.new_zeros(peers, counts.shape[0])
    table[me] = counts
    if peers > 1:
        dist.all_reduce(table, group=group)
    return table


def place_slots(
    topk_idx: torch.Tensor, n_experts: int, peers: int, me: int, group: Any, block: int, cap: int
) -> tuple[DirectPlan, torch.Tensor]:
    """Each slot's owner, place in the owner's buffer and send position (module docstring, step 1), and a
    device flag: a peer's slots exceed its block, or some rank's buffer its `cap` rows."""
    n, k = topk_idx.shape
    per_rank = n_experts // peers
    dev = topk_idx.device
    flat = topk_idx.reshape(-1)
    counts = expert_counts(flat, n_experts)
    table = _all_counts(counts, peers, me, group)
    total = table.sum(0)
    before_all = total.cumsum(0) - total
    start = before_all - before_all.view(peers, per_rank)[:, :1].expand(peers, per_rank).reshape(-1)
    before_me = (table.cumsum(0) - table)[me]
    mine = counts.cumsum(0) - counts  # where expert e's slots start in this rank's sorted order
    order = sort_keys(flat, n_experts)
    expert = flat.index_select(0, order)
    s = torch.arange(n * k, device=dev)
    place = start[expert] + before_me[expert] + (s - mine[expert])
    peer = expert // per_rank
    in_block = s - mine.view(peers, per_rank)[:, 0][peer]
    size = peers * block
    kept = in_block < block - 1  # the block's last row stays padding
    target = torch.where(kept, peer * block + in_block, size)  # `size`: a dump for the slots left out
    send_slot = torch.full((size + 1,), n * k, dtype=torch.long, device=dev).scatter_(0, target, order)[:size]
    send_place = torch.full((size + 1,), -1, dtype=torch.long, device=dev).scatter_(0, target, place)[:size]
    send_token = torch.where(send_slot < n * k, send_slot // k, max(n - 1, 0))
    pad = size - 1  # the last block's padding row
    position = torch.empty_like(order).scatter_(0, order, torch.where(kept, target, pad))  # (token, k) order
    slots = Bags(position, torch.arange(n + 1, device=dev) * k, torch.arange(n * k, device=dev) // k, pad=pad)
    ends = total.view(peers, per_rank)[me].cumsum(0).clamp(max=cap)
    local_counts = torch.diff(ends, prepend=ends.new_zeros(1))
    overflow = (~kept).any() | (total.view(peers, per_rank).sum(1) > cap).any()
    plan = DirectPlan(topk_idx, per_rank, block, cap, send_token, send_slot, send_place, slots, local_counts)
    return plan, overflow


def receive_slots(meta: torch.Tensor, cap: int) -> Arrived:
    """The receiver's map from received rows to buffer rows (places past `cap` are left out: the plan's
    overflow flag already says so)."""
    place = meta[:, 0].detach().long()
    rows, dev = meta.shape[0], meta.device
    valid = (place >= 0) & (place < cap)
    place = torch.where(valid, place, cap)
    pad = rows - 1  # the last block's last row: always padding
    # buffer row j copies received row at[j]; rows no slot was placed in copy the padding row
    at = torch.full((cap + 2,), pad, dtype=torch.long, device=dev)
    at = at.scatter_(0, torch.where(valid, place, cap + 1), torch.arange(rows, device=dev))[: cap + 1]
    filled = at != pad
    return Arrived(
        place,
        at,
        filled,
        Bags(place, torch.arange(rows + 1, device=dev), torch.arange(rows, device=dev), pad=cap),
        Bags(
            torch.where(filled, at, pad),
            torch.arange(cap + 2, device=dev),
            torch.arange(cap + 1, device=dev),
            pad=pad,
        ),
    )


class DirectDispatcher(BoundedDispatcher):
    """Direct placement (module docstring): the bounded dispatcher's fixed-size blocks, bound, overflow flag
    and `exact` path (the flat dispatcher's host-synced phases, for a step whose buffers overflowed), with
    a row per slot placed in its owner's buffer. Its blocks move by the all-to-all (no transport yet)."""

    def plan(self, topk_idx: torch.Tensor, n_experts: int) -> Program:
        """Every slot's place (one fixed-size count exchange; device work only)."""
        if self.exact:
            return (yield from super().plan(topk_idx, n_experts))
        n, k = topk_idx.shape
        per_rank = n_experts // self.ep
        block = slot_block(n, k, per_rank, self.ep, self.bound)
        cap = slot_capacity(n, k, per_rank, self.ep, self.bound)
        if cap >= 1 << 24:
            raise ValueError(f"direct dispatch: a buffer of {cap} rows exceeds the 2**24 places fp32 carries")

        def place(topk_idx: torch.Tensor) -> DirectPlan:
            plan, overflow = place_slots(topk_idx, n_experts, self.ep, self.ep_rank, self.group, block, cap)
            self.counters.note_overflow(overflow)
            return plan

        return (yield Compute("place", place, (topk_idx,), join=True))

    def dispatch_start(self, plan: Any, x: torch.Tensor, topk_weight: torch.Tensor) -> Program:
        """The slot rows in their peers' blocks, each with its place and gate, in one hop."""
        if isinstance(plan, FlatPlan):
            return (yield from super().dispatch_start(plan, x, topk_weight))

        def pack(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            meta = torch.stack([plan.send_place.to(w.dtype), _send_gates(w, plan)], dim=1)
            return gather_rows(x, plan.send_token, plan.slots), meta

        plan.weight = topk_weight
        send, meta = yield Compute("pack", pack, (x, topk_weight), join=True)
        return (yield Issue(self._block_hop("dispatch", plan.block, send), (send, meta)))

    def dispatch_wait(self, plan: Any, handle: Any) -> Program:
        """Received rows at their places: the buffer sorted by local expert, and each row's gate."""
        if isinstance(plan, FlatPlan):
            return (yield from super().dispatch_wait(plan, handle))
        rows, meta = yield Wait(handle)

        def put(rows: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a = plan.arrived = receive_slots(meta, plan.cap)
            gates = torch.where(a.filled, meta[:, 1].index_select(0, a.at), 0.0)
            return gather_rows(rows, a.at, a.to_buffer), plan.local_counts, gates

        return (yield Compute("put", put, (rows, meta), join=True))

    def combine_start(self, plan: Any, y: torch.Tensor, gates: torch.Tensor | None = None) -> Program:
        """Each received slot's expert row back in its block position (the sender weighs, where the experts
        did not: it holds the gates)."""
        if isinstance(plan, FlatPlan):
            return (yield from super().combine_start(plan, y, gates))
        plan.weigh = gates is not None

        def take(y: torch.Tensor) -> torch.Tensor:
            return gather_rows(y, plan.arrived.place, plan.arrived.to_rows)

        back = yield Compute("take", take, (y,), join=True)
        return (yield Issue(self._block_hop("combine", plan.block, back), (back,)))

    def combine_wait(self, plan: Any, handle: Any) -> Program:
        """Each token's sum of its k rows, in k order (weighted by its gates where the experts did not)."""
        if isinstance(plan, FlatPlan):
            return (yield from super().combine_wait(plan, handle))
        (back,) = yield Wait(handle)

        def total(back: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            return bag_sum(back, plan.slots, plan.send_token, None if w is None else _send_gates(w, plan))

        return (yield Compute("sum", total, (back, plan.weight if plan.weigh else None), join=True))


def _send_gates(w: torch.Tensor, plan: DirectPlan) -> torch.Tensor:
    """(peers·B,) the gate of each send row's slot (0 for padding), with its gradient."""
    return torch.cat([w.reshape(-1), w.new_zeros(1)]).index_select(0, plan.send_slot)

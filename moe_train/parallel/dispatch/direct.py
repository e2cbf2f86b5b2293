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

Over a board (board.py; `parallel.dispatch_transport=peer_write`: CUDA symmetric memory) no block is built
and nothing is placed twice. The senders post each buffer row's source (rank, token) and gate into its
owner's small map, every rank publishes its tokens' rows (one zero row appended), and each owner gathers its
buffer rows straight from the senders' published rows; in combine each owner publishes its expert rows and
each sender sums a token's k rows straight from the owners' (in k order, fp32). Backward is the same with the
roles swapped: the senders publish their output gradients and the owners gather them by the map; the owners
publish their input and gate gradients and the senders read them at their places. A row crosses once each
way, like the local dispatcher's two passes, plus a copy of the token rows (a kth of the slot rows) and of
the expert rows into the published buffers. Where the experts leave the weighing to the combine (FP8), the
owner weighs its rows by their gates in fp32 and publishes those fp32 products, so the sender's sum is the
twin's: the same fp32 products, summed in the same order, rounded once.

`B` and `C` are worst cases (a peer gets all of a rank's slots; a rank gets all slots of every rank), or
`parallel.dispatch_bound` times the balanced load. Overflow is never dropped silently: a device flag, the step
redone on the exact (flat) path, as the bounded dispatcher does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ...model.dispatch import expert_counts
from ...model.phases import Compute, Issue, Program, Wait
from ...ops.fp8 import pack_rows, unpack_rows
from ...ops.gather import Bags, bag_sum, gather_from, gather_rows, sort_keys, sum_bags_from
from ..comm import A2AHop, Exchange
from .board import Board
from .bounded import BoundedDispatcher
from .counters import row_bytes, sends_fp8
from .flat import FlatPlan
from .symm import Done


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
    tokens: int,
    hidden: int,
    k: int,
    per_rank: int,
    peers: int,
    bound: float | None,
    act_bytes: int,
    transport: str = "alltoall",
) -> tuple[float, int]:
    """For the memory estimate: the expert rows kept per token (the buffer, C + 1 rows) and the bytes of the
    exchange — the all-to-all twin's send and receive blocks with their places and gates (fp32), each way;
    over a board what a rank publishes (its tokens' rows with a zero row, its expert rows, fp32 where the
    combine weighs, their gate gradients) and its posted map, held once in symmetric memory (`peer_write`)
    or gathered from every peer (`collective`)."""
    block = slot_block(tokens, k, per_rank, peers, bound)
    cap = slot_capacity(tokens, k, per_rank, peers, bound)
    rows = (cap + 1) / max(1, tokens)
    if transport == "alltoall":
        return rows, 2 * 2 * peers * block * (hidden * act_bytes + 2 * 4)
    # rows: tokens (and their gradients); expert rows (fp32 where the combine weighs) and their gradients;
    # the gates' gradients (fp32); the map (rank, token, gate: fp32)
    published = (tokens + 1) * hidden * act_bytes + (cap + 1) * (hidden * (4 + act_bytes) + 4 + 3 * 4)
    return rows, published * (peers if transport == "collective" else 1)


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
    send_gates: torch.Tensor | None = None  # (peers·B,) the send rows' gates, for a board's post
    pulled: Pulled | None = None  # over a board: the owner's map of its buffer rows, once posted
    rows_dtype: torch.dtype = torch.float32  # the dispatched rows' (a weighing combine's sums round to it)
    reads: SenderReads | None = None  # over a board: where this rank's reads go, made once per call

    def sender_reads(self) -> SenderReads:
        """Where this rank's slots sit in their owners' buffers (made on first use, then kept: the layer's
        forward and backward read through it several times)."""
        if self.reads is None:
            inside = (self.send_place >= 0) & (self.send_place < self.cap)
            places = torch.where(inside, self.send_place, self.cap)
            at = self.slots.index  # each slot's send position
            bags = Bags(places.index_select(0, at), self.slots.offsets, self.slots.owner, self.cap)
            self.reads = SenderReads(places, at // self.block, bags)
        return self.reads


@dataclass
class SenderReads:
    """Over a board, where a sender's slots sit in their owners' buffers."""

    places: torch.Tensor  # (peers·B,) each send row's place, C (the padding row) for padding and for places
    # past the buffer (an overflowing step's, redone)
    owner: torch.Tensor  # (n·k,) each (token, k) slot's owner
    bags: Bags  # bag t = token t's k places in their owners' buffers (`pad` C for a slot left out)


@dataclass
class Pulled:
    """An owner's map of its buffer of C + 1 rows, from the senders' posts: row j holds token `token[j]` of
    rank `rank[j]`, with gate `gates[j]`; rows past the filled ones name this rank's published zero row."""

    rank: torch.Tensor  # (C + 1,) long
    token: torch.Tensor  # (C + 1,) long
    gates: torch.Tensor  # (C + 1,) fp32, 0 past the filled rows
    filled: torch.Tensor  # (C + 1,) bool


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


@dataclass
class PullHop(A2AHop):
    """The dispatch over a board (module docstring): tensors (the tokens' rows, the send rows' gates) in,
    (the owner's buffer rows, their gates) out; the board's reads, gradients included, in place of the
    twin's blocks."""

    board: Board | None = field(default=None, repr=False)
    plan: DirectPlan | None = field(default=None, repr=False)

    def forward_exchange(self, k: int, x: torch.Tensor) -> Exchange:
        assert self.board is not None and self.plan is not None
        plan, board = self.plan, self.board
        if k == 1:  # the gates came with the map
            assert plan.pulled is not None
            return Exchange(plan.pulled.gates, Done())
        n, dev = x.shape[0], x.device
        me = torch.full_like(plan.send_place, board.rank, dtype=torch.float32)
        token = plan.send_token.float()
        meta = torch.stack([me, token, plan.send_gates.float()], dim=1).view(board.size, plan.block, 3)
        places = plan.sender_reads().places.view(board.size, plan.block)
        got = board.post(plan.cap + 1, places, meta)
        filled = torch.arange(plan.cap + 1, device=dev) < plan.local_counts.sum()
        src, tok = got[:, 0], got[:, 1]
        # a row a step's overflow left unposted holds anything (that step is redone): read the zero row
        ok = filled & (src >= 0) & (src < board.size) & (tok >= 0) & (tok < n)
        plan.pulled = Pulled(
            torch.where(ok, src.long(), board.rank),
            torch.where(ok, tok.long(), n),  # n: the published zero row
            torch.where(ok, got[:, 2], 0.0),
            filled,
        )
        x = x.detach()
        sent = pack_rows(x) if self.fp8_rows else x
        rows = gather_from(board.publish(sent, zero_rows=1), plan.pulled.rank, plan.pulled.token)
        return Exchange(unpack_rows(rows, x.dtype) if self.fp8_rows else rows, Done())

    def backward_exchange(self, k: int, grad: torch.Tensor) -> Exchange:
        assert self.board is not None and self.plan is not None
        plan = self.plan
        reads = plan.sender_reads()
        if k == 0:  # a token's gradient: the sum of its slots' rows at their owners
            views = self.board.publish(grad.contiguous())
            return Exchange(sum_bags_from(views, reads.owner, reads.bags), Done())
        # a send row's gate gradient: its owner's at its place (padding rows get 0)
        views = self.board.publish(grad.float().unsqueeze(1))
        at = reads.places
        rows = gather_from(views, torch.arange(at.shape[0], device=at.device) // plan.block, at)
        return Exchange(torch.where(at < plan.cap, rows[:, 0], 0.0), Done())


@dataclass
class ReturnHop(A2AHop):
    """The combine over a board: the owner's expert rows in, each of this rank's tokens' sum of its k rows
    out (in the rows' dtype); backward gathers the tokens' gradients by the owner's map."""

    board: Board | None = field(default=None, repr=False)
    plan: DirectPlan | None = field(default=None, repr=False)

    def forward_exchange(self, k: int, y: torch.Tensor) -> Exchange:
        assert self.board is not None and self.plan is not None
        reads = self.plan.sender_reads()
        return Exchange(sum_bags_from(self.board.publish(y.detach()), reads.owner, reads.bags), Done())

    def backward_exchange(self, k: int, grad: torch.Tensor) -> Exchange:
        assert self.board is not None and self.plan is not None and self.plan.pulled is not None
        pulled = self.plan.pulled
        views = self.board.publish(grad.contiguous(), zero_rows=1)
        return Exchange(gather_from(views, pulled.rank, pulled.token), Done())


class DirectDispatcher(BoundedDispatcher):
    """Direct placement (module docstring): the bounded dispatcher's fixed-size blocks, bound, overflow flag
    and `exact` path (the flat dispatcher's host-synced phases, for a step whose buffers overflowed), with
    a row per slot placed in its owner's buffer. `transport`: a board (board.py), whose reads replace the
    blocks; None: the blocks move by the all-to-all (the twin)."""

    @property
    def board(self) -> Board | None:
        """The board its rows are read through (its `transport`); None: the all-to-all twin's blocks."""
        return self.transport if isinstance(self.transport, Board) else None

    def _board_hop(self, kind: type[A2AHop], name: str, plan: DirectPlan, rows: torch.Tensor) -> A2AHop:
        """A hop over the board, counted as the twin's blocks (what may cross: the bound; the rows that do
        are known on the device only)."""
        fp8 = sends_fp8(self.fp8_rows, name, rows)
        splits = [plan.block] * self.ep
        self.counters.add(name, splits, row_bytes(rows, fp8), self.ep_rank, self.peer_nodes)
        return kind(name, splits, splits, self.group, self.event_log, fp8, board=self.board, plan=plan)

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

        plan.weight, plan.rows_dtype = topk_weight, x.dtype
        if self.board is not None:

            def gates(w: torch.Tensor) -> torch.Tensor:
                send = _send_gates(w, plan)
                plan.send_gates = send.detach()
                return send

            send_gates = yield Compute("gates", gates, (topk_weight,), join=True)
            return (yield Issue(self._board_hop(PullHop, "dispatch", plan, x), (x, send_gates)))

        def pack(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            meta = torch.stack([plan.send_place.to(w.dtype), _send_gates(w, plan)], dim=1)
            return gather_rows(x, plan.send_token, plan.slots), meta

        send, meta = yield Compute("pack", pack, (x, topk_weight), join=True)
        return (yield Issue(self._block_hop("dispatch", plan.block, send), (send, meta)))

    def dispatch_wait(self, plan: Any, handle: Any) -> Program:
        """Received rows at their places: the buffer sorted by local expert, and each row's gate."""
        if isinstance(plan, FlatPlan):
            return (yield from super().dispatch_wait(plan, handle))
        if self.board is not None:
            rows, gates = yield Wait(handle)
            return rows, plan.local_counts, gates
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
        if self.board is not None:
            if plan.weigh:  # fp32 products, summed by the sender as the twin's combine sums them
                y = yield Compute("weigh", lambda y, g: _weighed(y, g, plan), (y, gates), join=True)
            return (yield Issue(self._board_hop(ReturnHop, "combine", plan, y), (y,)))

        def take(y: torch.Tensor) -> torch.Tensor:
            return gather_rows(y, plan.arrived.place, plan.arrived.to_rows)

        back = yield Compute("take", take, (y,), join=True)
        return (yield Issue(self._block_hop("combine", plan.block, back), (back,)))

    def combine_wait(self, plan: Any, handle: Any) -> Program:
        """Each token's sum of its k rows, in k order (weighted by its gates where the experts did not)."""
        if isinstance(plan, FlatPlan):
            return (yield from super().combine_wait(plan, handle))
        (back,) = yield Wait(handle)
        if self.board is not None:
            if not plan.weigh:
                return back
            return (yield Compute("round", lambda b: b.to(plan.rows_dtype), (back,), join=True))

        def total(back: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            return bag_sum(back, plan.slots, plan.send_token, None if w is None else _send_gates(w, plan))

        return (yield Compute("sum", total, (back, plan.weight if plan.weigh else None), join=True))


def _send_gates(w: torch.Tensor, plan: DirectPlan) -> torch.Tensor:
    """(peers·B,) the gate of each send row's slot (0 for padding), with its gradient."""
    return torch.cat([w.reshape(-1), w.new_zeros(1)]).index_select(0, plan.send_slot)


def _weighed(y: torch.Tensor, gates: torch.Tensor, plan: DirectPlan) -> torch.Tensor:
    """The owner's rows times their gates, in fp32 (rows nobody filled: 0, whatever the experts left)."""
    assert plan.pulled is not None
    filled = plan.pulled.filled.unsqueeze(1)
    return torch.where(filled, y, 0).float() * gates.float().unsqueeze(1)

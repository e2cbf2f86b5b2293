"""Expert-parallel dispatchers: tokens travel to the ranks that own their experts and come back.

All-to-all dispatcher, per MoE layer:
1. plan: for every token, the set of ep ranks holding any of its top-k experts. Each (token, rank) pair is
   one row to send — a token with several experts on one rank goes there once. Row counts are exchanged
   (the one host synchronisation: split sizes must be known to size buffers), then each row's slot metadata
   (local expert id, or −1, and gate weight for each of the k slots) travels alongside.
2. dispatch: rows leave in (rank, token) order, `all_to_all_single` with uneven splits; the receiver expands
   each row to its valid slots and sorts them by local expert for the grouped GEMM.
3. combine: the receiver forms each row's gate-weighted partial sum over its slots, so one row per
   (token, rank) travels back; the sender adds the partial sums of a token's ranks.
Rows move with `gather_rows`, whose backward is a gather by the inverse map (no scatter-add): copy speed on
GPUs, and deterministic summation order on CPU (see docs/architecture.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.gather import gather_rows
from .comm import A2A, a2a_start, a2a_wait, all_to_all, exchange_counts


@dataclass
class CommCounters:
    """Bytes moved by dispatchers, from the real split sizes; the trainer reads and resets them each step.

    Keys: 'dispatch' / 'combine' (all rows, self included), '*_remote' (rows to another rank),
    '*_inter_node' / '*_intra_node' (rows to another rank on another / the same node).
    """

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, splits: list[int], row_bytes: int, me: int, peer_nodes: list[int]) -> None:
        """splits[i] rows of row_bytes go to group peer i; peer_nodes[i] is that peer's node."""
        for peer, rows in enumerate(splits):
            b = rows * row_bytes
            self.bytes[kind] += b
            if peer == me or rows == 0:
                continue
            self.bytes[f"{kind}_remote"] += b
            where = "inter_node" if peer_nodes[peer] != peer_nodes[me] else "intra_node"
            self.bytes[f"{kind}_{where}"] += b

    def take(self) -> dict[str, int]:
        out = dict(self.bytes)
        self.bytes.clear()
        return out


@dataclass
class A2APlan:
    n_tokens: int
    k: int
    fan: int  # most ranks one token can reach: min(ep, k)
    pair_token: torch.Tensor  # (P,) source token of each sent row, rows in (rank, token) order
    pair_pos: torch.Tensor  # (P,) slot of each pair in the (token, fan) layout: token·fan + c
    tok_slots: torch.Tensor  # (N, fan) the pair (sent row) in each slot of a token (0 where unused)
    tok_mask: torch.Tensor  # (N, fan) bool: slot used
    send_splits: list[int]
    recv_splits: list[int]
    recv_weight: torch.Tensor  # (R, K) gate weight per received row and slot, 0 for other ranks' slots
    slot_order: torch.Tensor  # (M,) positions in the received (row, slot) layout, sorted by local expert
    slot_row: torch.Tensor  # (M,) received row of each sorted slot
    slot_pos: torch.Tensor  # (R, K) sorted position of each received (row, slot) (0 where unused)
    slot_valid: torch.Tensor  # (R, K) bool: the slot is one of this rank's experts
    local_counts: torch.Tensor  # (experts_per_rank,) rows per local expert


@dataclass
class Pending:
    plan: A2APlan
    buf: torch.Tensor
    comm: A2A


def _inverse(order: torch.Tensor, size: int) -> torch.Tensor:
    """inv[order[i]] = i; positions not in `order` get 0 (callers mask them)."""
    inv = torch.zeros(size, dtype=torch.long, device=order.device)
    return inv.index_copy_(0, order, torch.arange(order.numel(), device=order.device))


def receiver_slots(recv_id: torch.Tensor, per_rank: int) -> dict[str, torch.Tensor]:
    """Sort the received (row, slot) pairs that name one of this rank's experts by expert.

    recv_id: (R, K) local expert id per received row and slot, −1 for slots served elsewhere. Returns the
    fields the dispatchers' plans share: slot_order, slot_row, slot_pos, slot_valid, local_counts.
    One host sync: the number of valid slots.
    """
    rows, k = recv_id.shape
    flat_id = recv_id.reshape(-1)
    valid = flat_id >= 0
    key = torch.where(valid, flat_id, per_rank)  # other ranks' slots sort last
    counts = torch.zeros(per_rank + 1, dtype=torch.long, device=recv_id.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    m = rows * k - int(counts[per_rank])
    slot_order = torch.argsort(key, stable=True)[:m]
    return {
        "slot_order": slot_order,
        "slot_row": slot_order // k,
        "slot_pos": _inverse(slot_order, rows * k).view(rows, k),
        "slot_valid": valid.view(rows, k),
        "local_counts": counts[:per_rank],
    }


def expand_to_slots(rows: torch.Tensor, plan: Any) -> torch.Tensor:
    """Received rows -> one row per slot served here, sorted by local expert (for the grouped GEMM)."""
    return gather_rows(rows, plan.slot_row, plan.slot_pos, plan.slot_valid)


def slot_weighted_sums(y: torch.Tensor, plan: Any) -> torch.Tensor:
    """Each received row's gate-weighted sum over its slots (products in y's dtype, fp32 sum): what one row
    carries back. `plan` has the fields `receiver_slots` returns plus `recv_weight` (R, K)."""
    n_rows, k = plan.recv_weight.shape
    y_slots = gather_rows(y, plan.slot_pos.reshape(-1), plan.slot_order.view(-1, 1)).view(
        n_rows, k, y.shape[-1]
    )
    return (y_slots * plan.recv_weight.to(y.dtype).unsqueeze(-1)).sum(1)


class AllToAllDispatcher:
    """Flat all-to-all over the expert-parallel group (`ep` ranks, `n_experts / ep` experts each)."""

    def __init__(
        self,
        group: Any,
        ep: int,
        ep_rank: int,
        counters: CommCounters | None = None,
        peer_nodes: list[int] | None = None,
        event_log: list[str] | None = None,
    ) -> None:
        self.group, self.ep, self.ep_rank = group, ep, ep_rank
        self.counters = counters
        self.peer_nodes = peer_nodes or [0] * ep  # node of each ep peer, for the byte counters
        self.event_log = event_log

    # ------------------------------------------------------------------------------------------- plan
    def plan(self, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int) -> A2APlan:
        """Host syncs: the split sizes and the received slot count. Collectives: the row counts, then one
        exchange carrying each row's slot metadata (local expert ids and gate weights together)."""
        n, k = topk_idx.shape
        dev = topk_idx.device
        per_rank = n_experts // self.ep
        fan = min(self.ep, k)
        dest = topk_idx // per_rank  # (N, K) owner rank of each slot
        uses = torch.zeros(self.ep * n, dtype=torch.bool, device=dev)
        uses[(dest.t() * n + torch.arange(n, device=dev)).reshape(-1)] = True
        uses = uses.view(self.ep, n)
        send_counts = uses.sum(1)
        recv_counts = exchange_counts(send_counts, self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        # the pair count is known now: a static-size nonzero needs no second host sync
        pairs = torch.nonzero_static(uses, size=sum(send_splits))  # sorted by rank, then token
        pair_rank, pair_token = pairs[:, 0], pairs[:, 1]

        # slot c of a token = the rank's order among the token's ranks (ascending)
        rank_order = uses.long().cumsum(0) - 1
        pair_pos = pair_token * fan + rank_order[pair_rank, pair_token]
        tok_slots = _inverse(pair_pos, n * fan).view(n, fan)
        tok_mask = (
            torch.zeros(n * fan, dtype=torch.bool, device=dev).index_fill_(0, pair_pos, True).view(n, fan)
        )

        same = dest.index_select(0, pair_token) == pair_rank.unsqueeze(1)  # (P, K): slot lives there
        local_id = torch.where(
            same, topk_idx.index_select(0, pair_token) - pair_rank.unsqueeze(1) * per_rank, -1
        )
        w_rows = gather_rows(topk_weight, pair_token, tok_slots, tok_mask)
        w_rows = torch.where(same, w_rows, torch.zeros_like(w_rows))
        # ids ride as fp32 beside the weights (exact below 2**24): one exchange instead of two; only the
        # weight columns carry gradient
        meta = torch.cat([local_id.to(w_rows.dtype), w_rows], dim=1)
        recv_meta = all_to_all(meta, recv_splits, send_splits, self.group)
        recv_id = recv_meta[:, :k].detach().round().long()
        recv_w = recv_meta[:, k:]

        return A2APlan(
            n_tokens=n,
            k=k,
            fan=fan,
            pair_token=pair_token,
            pair_pos=pair_pos,
            tok_slots=tok_slots,
            tok_mask=tok_mask,
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_weight=recv_w,
            **receiver_slots(recv_id, per_rank),
        )

    # ------------------------------------------------------------------------------ dispatch (async)
    def dispatch_start(self, x: torch.Tensor, plan: A2APlan) -> Pending:
        send = gather_rows(x, plan.pair_token, plan.tok_slots, plan.tok_mask)
        comm = A2A(plan.recv_splits, plan.send_splits, self.group, log=self.event_log, name="dispatch")
        if self.counters is not None:
            row_bytes = x.shape[-1] * x.element_size()
            self.counters.add("dispatch", plan.send_splits, row_bytes, self.ep_rank, self.peer_nodes)
        return Pending(plan, a2a_start(send, comm, after=(plan.recv_weight,)), comm)

    def dispatch_wait(self, pending: Pending) -> torch.Tensor:
        """Received rows, expanded to their slots and sorted by local expert."""
        return expand_to_slots(a2a_wait(pending.buf, pending.comm), pending.plan)

    # ------------------------------------------------------------------------------- combine (async)
    def combine_start(self, y: torch.Tensor, plan: A2APlan) -> Pending:
        """Each received row's gate-weighted sum over its slots, sent back once."""
        partial = slot_weighted_sums(y, plan)
        comm = A2A(plan.send_splits, plan.recv_splits, self.group, log=self.event_log, name="combine")
        if self.counters is not None:
            row_bytes = y.shape[-1] * y.element_size()
            self.counters.add("combine", plan.recv_splits, row_bytes, self.ep_rank, self.peer_nodes)
        return Pending(plan, a2a_start(partial, comm), comm)

    def combine_wait(self, pending: Pending) -> torch.Tensor:
        """Sum of each token's partial results from its ranks."""
        back = a2a_wait(pending.buf, pending.comm)
        plan = pending.plan
        n, hidden = plan.n_tokens, back.shape[-1]
        per_slot = gather_rows(back, plan.tok_slots.reshape(-1), plan.pair_pos.view(-1, 1)).view(
            n, plan.fan, hidden
        )
        return (per_slot * plan.tok_mask.unsqueeze(-1).to(back.dtype)).sum(1)

    # ------------------------------------------------------------------ the Dispatcher seam (blocking)
    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, A2APlan]:
        plan = self.plan(topk_idx, topk_weight, n_experts)
        return self.dispatch_wait(self.dispatch_start(x, plan)), plan.local_counts, plan

    def combine(self, y: torch.Tensor, plan: A2APlan) -> torch.Tensor:
        return self.combine_wait(self.combine_start(y, plan))

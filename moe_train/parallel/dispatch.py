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
Every gather below indexes with unique positions (a permutation of an expanded view), never with repeated
ones, so CPU backward passes are deterministic (see docs/architecture.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from .comm import A2A, a2a_start, a2a_wait, all_to_all, all_to_all_nograd, exchange_counts


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
    pair_index: torch.Tensor  # (P,) positions in the (rank, token)-expanded view of x: rank·N + token
    pair_token: torch.Tensor  # (P,) source token of each sent row
    send_splits: list[int]
    recv_splits: list[int]
    slot_order: torch.Tensor  # (M,) positions in the received (row, slot) view, sorted by local expert
    slot_row: torch.Tensor  # (M,) received row of each sorted slot
    slot_weight: torch.Tensor  # (M,) gate weight of each sorted slot (fp32, differentiable)
    recv_weight: torch.Tensor  # (R, K) received weights: the dispatch exchange is chained after it
    local_counts: torch.Tensor  # (experts_per_rank,) rows per local expert
    k: int


@dataclass
class Pending:
    plan: A2APlan
    buf: torch.Tensor
    comm: A2A


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
        n, k = topk_idx.shape
        per_rank = n_experts // self.ep
        dest = topk_idx // per_rank  # (N, K) owner rank of each slot
        uses = torch.zeros(self.ep, n, dtype=torch.bool, device=topk_idx.device)
        uses[dest.t().reshape(-1), torch.arange(n, device=topk_idx.device).repeat(k)] = True
        pair_rank, pair_token = uses.nonzero(as_tuple=True)  # sorted by rank, then token
        send_counts = uses.sum(1)
        recv_counts = exchange_counts(send_counts, self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

        pair_index = pair_rank * n + pair_token  # unique positions in the (rank, token)-expanded view
        same = dest[pair_token] == pair_rank.unsqueeze(1)  # (P, K): slot lives on the row's rank
        local_id = torch.where(same, topk_idx[pair_token] - pair_rank.unsqueeze(1) * per_rank, -1)
        w_rows = topk_weight.unsqueeze(0).expand(self.ep, -1, -1).reshape(-1, k)[pair_index]
        w_rows = torch.where(same, w_rows, torch.zeros_like(w_rows))
        recv_id = all_to_all_nograd(local_id, recv_splits, send_splits, self.group)
        recv_w = all_to_all(w_rows, recv_splits, send_splits, self.group)

        flat_id = recv_id.reshape(-1)
        valid = (flat_id >= 0).nonzero().squeeze(1)
        slot_order = valid[torch.argsort(flat_id[valid], stable=True)]
        local_counts = torch.bincount(flat_id[valid], minlength=per_rank)
        return A2APlan(
            n_tokens=n,
            pair_index=pair_index,
            pair_token=pair_token,
            send_splits=send_splits,
            recv_splits=recv_splits,
            slot_order=slot_order,
            slot_row=slot_order // k,
            slot_weight=recv_w.reshape(-1)[slot_order].float(),
            local_counts=local_counts,
            recv_weight=recv_w,
            k=k,
        )

    # ------------------------------------------------------------------------------ dispatch (async)
    def dispatch_start(self, x: torch.Tensor, plan: A2APlan) -> Pending:
        send = x.unsqueeze(0).expand(self.ep, -1, -1).reshape(-1, x.shape[-1])[plan.pair_index]
        comm = A2A(plan.recv_splits, plan.send_splits, self.group, log=self.event_log, name="dispatch")
        if self.counters is not None:
            row_bytes = x.shape[-1] * x.element_size()
            self.counters.add("dispatch", plan.send_splits, row_bytes, self.ep_rank, self.peer_nodes)
        return Pending(plan, a2a_start(send, comm, after=(plan.recv_weight,)), comm)

    def dispatch_wait(self, pending: Pending) -> torch.Tensor:
        rows = a2a_wait(pending.buf, pending.comm)
        plan = pending.plan
        h = rows.shape[-1]
        return rows.unsqueeze(1).expand(-1, plan.k, -1).reshape(-1, h)[plan.slot_order]

    # ------------------------------------------------------------------------------- combine (async)
    def combine_start(self, y: torch.Tensor, plan: A2APlan) -> Pending:
        partial = torch.zeros(sum(plan.recv_splits), y.shape[-1], dtype=torch.float32, device=y.device)
        partial.index_add_(0, plan.slot_row, y.float() * plan.slot_weight.unsqueeze(-1))
        partial = partial.to(y.dtype)
        comm = A2A(plan.send_splits, plan.recv_splits, self.group, log=self.event_log, name="combine")
        if self.counters is not None:
            row_bytes = y.shape[-1] * y.element_size()
            self.counters.add("combine", plan.recv_splits, row_bytes, self.ep_rank, self.peer_nodes)
        return Pending(plan, a2a_start(partial, comm), comm)

    def combine_wait(self, pending: Pending) -> torch.Tensor:
        back = a2a_wait(pending.buf, pending.comm)
        plan = pending.plan
        out = torch.zeros(plan.n_tokens, back.shape[-1], dtype=torch.float32, device=back.device)
        out.index_add_(0, plan.pair_token, back.float())
        return out.to(back.dtype)

    # ------------------------------------------------------------------ the Dispatcher seam (blocking)
    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, A2APlan]:
        plan = self.plan(topk_idx, topk_weight, n_experts)
        return self.dispatch_wait(self.dispatch_start(x, plan)), plan.local_counts, plan

    def combine(self, y: torch.Tensor, plan: A2APlan) -> torch.Tensor:
        return self.combine_wait(self.combine_start(y, plan))

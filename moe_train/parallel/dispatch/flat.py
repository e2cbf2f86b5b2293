"""Flat all-to-all dispatcher over the expert-parallel group (`ep` ranks, `n_experts / ep` experts each).

Per MoE layer:
1. plan: for every token, the set of ep ranks holding any of its top-k experts. Each (token, rank) pair is
   one row to send — a token with several experts on one rank goes there once. One small exchange carries
   the row counts and, per destination expert, the slot counts; the host reads it once (the only host
   synchronisation: split sizes must be known to size buffers, and the receiver's slot count and rows per
   expert come with them).
2. dispatch: rows leave in (rank, token) order, `all_to_all_single` with uneven splits, each with its slot
   metadata (global expert ids and gate weights of its k slots) in the same exchange; the receiver expands
   each row to the slots its experts serve and sorts them by local expert for the grouped GEMM.
3. combine: the receiver forms each row's gate-weighted partial sum over its valid slots, so one row per
   (token, rank) travels back; the sender adds the partial sums of a token's ranks.
Rows move with `gather_rows` and are summed with `bag_sum` (ops/gather.py): each pass reads only the rows
that exist, backward passes are gathers (no scatter-add), and summation order is fixed (deterministic on
CPU, see docs/architecture.md). Why this shape: docs/performance.md, "Expert-parallel dispatch".
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
    RouteStart,
    Slots,
    expand_to_slots,
    receiver_slots,
    route_finish,
    route_start,
    send_slot_meta,
    slot_meta,
    slot_weighted_sums,
    sum_over_route,
)


@dataclass
class A2APlan:
    n_tokens: int
    route: Route  # tokens -> the ranks holding their experts
    slots: Slots  # what this rank received, expanded and sorted for its experts

    @property
    def send_splits(self) -> list[int]:
        return self.route.send_splits

    @property
    def recv_splits(self) -> list[int]:
        return self.route.recv_splits

    @property
    def local_counts(self) -> torch.Tensor:
        return self.slots.local_counts


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
        """One host sync (split sizes, slot count and rows per local expert, from one count exchange);
        then one exchange carrying each row's slot metadata (global expert ids and gate weights together),
        which the host does not wait for."""
        r = route_finish(self.route_start(topk_idx, n_experts))
        meta = send_slot_meta(r, slot_meta(topk_idx, topk_weight), self.group)
        return A2APlan(n_tokens=topk_idx.shape[0], route=r, slots=self.receive(meta, r, n_experts))

    # The plan's parts, also used by the overlap engine (parallel/overlap.py), which runs them as sub-steps.
    def route_start(self, topk_idx: torch.Tensor, n_experts: int, stream: Any = None) -> RouteStart:
        """Count the (token, rank) rows and launch the count exchange (`route_finish` waits for it)."""
        per_rank = n_experts // self.ep
        return route_start(topk_idx // per_rank, self.ep, self.group, topk_idx, per_rank, stream=stream)

    def receive(self, meta: torch.Tensor, r: Route, n_experts: int) -> Slots:
        """The received rows' slots that name this rank's experts, sorted by local expert."""
        per_rank = n_experts // self.ep
        return receiver_slots(meta, self.ep_rank * per_rank, per_rank, r.recv_slots, r.recv_key_counts)

    def count(self, kind: str, splits: list[int], rows: torch.Tensor) -> None:
        """Add one exchange of `rows`' rows (splits[i] to peer i) to the byte counters."""
        if self.counters is not None:
            row_bytes = rows.shape[-1] * rows.element_size()
            self.counters.add(kind, splits, row_bytes, self.ep_rank, self.peer_nodes)

    # ------------------------------------------------------------------------------ dispatch (async)
    def dispatch_start(self, x: torch.Tensor, plan: A2APlan) -> Pending:
        r = plan.route
        send = gather_rows(x, r.pair_row, r.rows)
        comm = A2A(r.recv_splits, r.send_splits, self.group, log=self.event_log, name="dispatch")
        self.count("dispatch", r.send_splits, x)
        # Backward order: this exchange before the metadata's (see comm.a2a_start).
        return Pending(plan, a2a_start(send, comm, after=(plan.slots.weight,)), comm)

    def dispatch_wait(self, pending: Pending) -> torch.Tensor:
        """Received rows, expanded to their slots and sorted by local expert."""
        return expand_to_slots(a2a_wait(pending.buf, pending.comm), pending.plan.slots)

    # ------------------------------------------------------------------------------- combine (async)
    def combine_start(self, y: torch.Tensor, plan: A2APlan) -> Pending:
        """Each received row's gate-weighted sum over its slots, sent back once."""
        partial = slot_weighted_sums(y, plan.slots)
        r = plan.route
        comm = A2A(r.send_splits, r.recv_splits, self.group, log=self.event_log, name="combine")
        self.count("combine", r.recv_splits, y)
        return Pending(plan, a2a_start(partial, comm), comm)

    def combine_wait(self, pending: Pending) -> torch.Tensor:
        """Sum of each token's partial results from its ranks."""
        return sum_over_route(a2a_wait(pending.buf, pending.comm), pending.plan.route)

    # ------------------------------------------------------------------ the Dispatcher seam (blocking)
    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, A2APlan]:
        plan = self.plan(topk_idx, topk_weight, n_experts)
        return self.dispatch_wait(self.dispatch_start(x, plan)), plan.local_counts, plan

    def combine(self, y: torch.Tensor, plan: A2APlan) -> torch.Tensor:
        return self.combine_wait(self.combine_start(y, plan))

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
3. combine: the receiver forms each row's partial sum over its valid slots (gate-weighted by the experts),
   so one row per (token, rank) travels back; the sender adds the partial sums of a token's ranks.
Rows move with `gather_rows` and are summed with `bag_sum` (ops/gather.py): each pass reads only the rows
that exist, backward passes are gathers (no scatter-add), and summation order is fixed (deterministic on
CPU, see docs/architecture.md). Why this shape: docs/performance.md, "Expert-parallel dispatch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...model.phases import Compute, Issue, Prepare, Program, Wait
from ..comm import A2AHop
from .counters import CommCounters, row_bytes, sends_fp8
from .rows import (
    Route,
    Slots,
    route_finish,
    route_start,
    rows_with_meta,
    slot_meta,
    slot_sums,
    sum_over_route,
    unpack_for_experts,
)


@dataclass
class FlatPlan:
    """One layer call: the rows' route, then (once received) the slots this rank's experts serve."""

    route: Route
    topk_idx: torch.Tensor
    per_rank: int
    slots: Slots | None = None


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
        fp8_rows: bool = False,
    ) -> None:
        self.group, self.ep, self.ep_rank = group, ep, ep_rank
        self.fp8_rows = fp8_rows  # dispatch rows travel as FP8 tiles (parallel/comm.py)
        self.counters = counters
        self.peer_nodes = peer_nodes or [0] * ep  # node of each ep peer, for the byte counters
        self.event_log = event_log

    def _hop(self, name: str, send: list[int], recv: list[int], rows: torch.Tensor) -> A2AHop:
        """A hop, added to the byte counters (`rows`: one of the rows it moves)."""
        fp8 = sends_fp8(self.fp8_rows, name, rows)
        if self.counters is not None:
            self.counters.add(name, send, row_bytes(rows, fp8), self.ep_rank, self.peer_nodes)
        return A2AHop(name, send, recv, self.group, self.event_log, fp8)

    def plan(self, topk_idx: torch.Tensor, n_experts: int) -> Program:
        """The count exchange (the one host sync): rows per peer, and slots per expert for the receiver."""
        per_rank = n_experts // self.ep

        def start(stream: Any) -> Any:
            return route_start(topk_idx // per_rank, self.ep, self.group, topk_idx, per_rank, stream=stream)

        r = yield Prepare("counts", start, route_finish)
        return FlatPlan(r, topk_idx, per_rank)

    def dispatch_start(self, plan: FlatPlan, x: torch.Tensor, topk_weight: torch.Tensor) -> Program:
        """Each (token, rank) row and its slot metadata leave in one hop."""
        r = plan.route

        def pack(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rows_with_meta(x, slot_meta(plan.topk_idx, w), r)

        send, meta = yield Compute("pack", pack, (x, topk_weight), join=True)
        return (yield Issue(self._hop("dispatch", r.send_splits, r.recv_splits, send), (send, meta)))

    def dispatch_wait(self, plan: FlatPlan, handle: Any) -> Program:
        """Received rows, expanded to the slots of this rank's experts and sorted by local expert."""
        rows, meta = yield Wait(handle)
        r, per = plan.route, plan.per_rank

        def unpack(rows: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            plan.slots, expert_rows = unpack_for_experts(rows, meta, self.ep_rank * per, per, r)
            return expert_rows, plan.slots.local_counts, plan.slots.gates

        return (yield Compute("unpack", unpack, (rows, meta), join=True))

    def combine_start(self, plan: FlatPlan, y: torch.Tensor, gates: torch.Tensor | None = None) -> Program:
        """Each received row's sum over its slots (gate-weighted by the experts) goes back once."""
        r = plan.route
        partial = yield Compute("sum", lambda y, g: slot_sums(y, plan.slots, g), (y, gates), join=True)
        return (yield Issue(self._hop("combine", r.recv_splits, r.send_splits, partial), (partial,)))

    def combine_wait(self, plan: FlatPlan, handle: Any) -> Program:
        """Each token's sum of the partial results from its ranks."""
        (back,) = yield Wait(handle)
        return (yield Compute("sum", lambda b: sum_over_route(b, plan.route), (back,), join=True))

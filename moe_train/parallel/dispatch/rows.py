"""Row plans shared by the dispatchers: which rows go where, how the receiver expands and sums them.

`route` turns "which peer holds each of a row's k slots" into send/receive lists and split sizes, with one
small count exchange the host reads (split sizes must be known to size buffers; the receiver's slot count
and rows per key come with it). `slot_meta` is what travels beside each row: its global expert ids and gate
weights. `receiver_slots` sorts the received slots of this rank's experts by expert, with each slot's gate
for the experts' activation; `expand_to_slots`, `slot_sums` and `sum_over_route` move and add the rows
with `gather_rows` / `bag_sum` (ops/gather.py): each pass reads only the rows that exist, backward passes
are gathers (no scatter-add), and summation order is fixed (deterministic on CPU, see
docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ...ops.gather import Bags, bag_sum, gather_rows, sort_keys


@dataclass
class Route:
    """One exchange's row movement: each unique (source row, peer) pair is one sent row, in (peer, row) order.

    With slot counting (`slot_key` of `route_start`), the count exchange also told this rank how many slots
    of each of its keys (local experts) it will receive, so the receiver sizes its expert-sorted buffer
    without a sync.
    """

    n_rows: int
    pair_row: torch.Tensor  # (P,) source row of each sent row
    pair_peer: torch.Tensor  # (P,) peer of each sent row
    rows: Bags  # bag j = the sent rows copying source row j, in peer order (gather backward, combine sum)
    send_splits: list[int]
    recv_splits: list[int]
    recv_slots: int = 0  # slots received for this rank's keys (with slot counting)
    recv_key_counts: torch.Tensor | None = None  # (keys_per_peer,) slots received per key, on device


@dataclass
class RouteStart:
    """A route whose count exchange is in flight (`route_start`); `route_finish` completes it."""

    n: int
    peers: int
    uses: torch.Tensor  # (peers, n) bool: row j goes to peer p
    counts: torch.Tensor  # (peers, 1 + keys) sent
    recv: torch.Tensor  # (peers, 1 + keys) received (valid once waited)
    work: Any = None  # the exchange's work handle (no side stream)
    host: torch.Tensor | None = None  # pinned copy of [counts; recv] (side stream)
    done: Any = None  # CUDA event after that copy (side stream)
    slot_counting: bool = False


def route_start(
    owner: torch.Tensor,
    peers: int,
    group: Any,
    slot_key: torch.Tensor | None = None,
    keys_per_peer: int = 0,
    unheld: bool = False,
    stream: Any = None,
) -> RouteStart:
    """Rows to send for `owner` (n, k): the peer holding each slot (−1 for none, allowed with `unheld`).
    Counts the rows and launches the count exchange; returns without waiting (`route_finish` waits: the one
    host synchronisation, since split sizes must be known to size the buffers). With `slot_key` (n, k) —
    each held slot's key, peer · keys_per_peer + the key on that peer, e.g. the expert id — the same exchange
    carries how many slots of each key go to each peer: the receiver learns its slot count and rows per
    expert from it, not from a second synchronisation.

    stream (CUDA only): run the exchange and its copy to pinned host memory on this side stream, so that
    `route_finish` waits for them alone — not for compute queued on the current stream after this call
    (the overlap engine queues the other micro-batch's backward there while the host waits)."""
    n = owner.shape[0]
    dev = owner.device
    held = owner >= 0 if unheld else None
    if held is not None:  # slots held by no peer go to a spare row, dropped: no boolean indexing, no sync
        owner = torch.where(held, owner, peers)
    uses = torch.zeros(peers + unheld, n, dtype=torch.bool, device=dev).scatter_(0, owner.t(), True)[:peers]
    # counts[peer] = [rows to it, slots of each of its keys]; a spare entry at the end for unheld slots
    width = 1 + keys_per_peer
    counts = torch.zeros(peers * width + 1, dtype=torch.long, device=dev)
    if slot_key is not None:
        key = slot_key + owner + 1  # = owner · width + 1 + key on the peer
        if held is not None:
            key = torch.where(held, key, peers * width)
        key = key.reshape(-1)
        counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:-1].view(peers, width)
    counts[:, 0].copy_(uses.sum(1))
    if stream is None:
        recv = torch.empty_like(counts)
        work = dist.all_to_all_single(recv, counts, group=group, async_op=True)
        return RouteStart(n, peers, uses, counts, recv, work=work, slot_counting=slot_key is not None)
    ready = torch.cuda.Event()
    ready.record()
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=group)  # the side stream waits for it, not the host
        host = torch.empty((2 * peers, width), dtype=counts.dtype, pin_memory=True)
        host.copy_(torch.cat([counts, recv]), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    counts.record_stream(stream)
    return RouteStart(n, peers, uses, counts, recv, host=host, done=done, slot_counting=slot_key is not None)


def route_finish(p: RouteStart) -> Route:
    """Wait for the counts (the one host sync) and build the row lists."""
    if p.done is not None:
        p.done.synchronize()  # the host waits for the count exchange and its copy only
        cur = torch.cuda.current_stream()
        cur.wait_event(p.done)
        p.recv.record_stream(cur)
        host = p.host.tolist()
    else:
        p.work.wait()
        host = torch.cat([p.counts, p.recv]).tolist()  # the one host sync
    n, peers, uses, recv, dev = p.n, p.peers, p.uses, p.recv, p.uses.device
    send_splits = [c[0] for c in host[:peers]]
    recv_splits = [c[0] for c in host[peers:]]
    recv_slots = sum(sum(c[1:]) for c in host[peers:])

    pair_peer, pair_row = torch.nonzero_static(uses, size=sum(send_splits)).t().contiguous()  # by peer, row
    # bag of a source row: its sent rows in peer order (the pairs sorted by (row, peer); keys are unique)
    index = torch.argsort(pair_row * peers + pair_peer)
    offsets = torch.zeros(n + 1, dtype=torch.long, device=dev)
    torch.cumsum(uses.sum(0), 0, out=offsets[1:])
    return Route(
        n_rows=n,
        pair_row=pair_row,
        pair_peer=pair_peer,
        rows=Bags(index, offsets, pair_row.index_select(0, index)),
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_slots=recv_slots,
        recv_key_counts=recv[:, 1:].sum(0) if p.slot_counting else None,
    )


def slot_meta(expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, 2k): each row's global expert ids (as floats, exact below 2**24) beside its gate weights; the
    metadata one exchange moves (only the weights carry gradient: the router learns through them)."""
    return torch.cat([expert.to(weight.dtype), weight], dim=1)


def meta_experts(meta: torch.Tensor) -> torch.Tensor:
    """The global expert ids of received `slot_meta` rows, (R, K) int64."""
    return meta[:, : meta.shape[1] // 2].detach().long()


@dataclass
class Slots:
    """The received (row, slot) pairs served by this rank's experts, sorted by local expert.

    Sorted slot s copies received row slot_row[s]; bag r of `rows` lists row r's slots (in k order) by
    sorted position — the inverse map for the expansion's backward and the bags of the combine's sums.
    """

    slot_row: torch.Tensor  # (M,)
    rows: Bags
    gates: torch.Tensor  # (M,) gate weight of each sorted slot (carries the gradient to the metadata)
    local_counts: torch.Tensor  # (experts_per_rank,) slots per local expert


def receiver_slots(
    meta: torch.Tensor, first_expert: int, per_rank: int, m: int, local_counts: torch.Tensor
) -> Slots:
    """Sort the received slots that name one of this rank's experts (first_expert … + per_rank) by expert,
    ties in (row, k) order.

    meta: (R, 2K) received `slot_meta`; m and local_counts came with the row counts (`route` with slot
    counting): no host sync.
    """
    rows, k = meta.shape[0], meta.shape[1] // 2
    experts = meta_experts(meta)
    valid = experts // per_rank == first_expert // per_rank
    key = torch.where(valid, experts - first_expert, per_rank).view(-1)  # other ranks' slots sort last
    slot_order = sort_keys(key, per_rank)[:m]  # (row, k) positions, by expert
    valid_pos, bag_index = torch.sort(slot_order)  # row-major valid positions; their sorted positions
    offsets = torch.zeros(rows + 1, dtype=torch.long, device=meta.device)
    torch.cumsum(valid.sum(1), 0, out=offsets[1:])
    return Slots(
        slot_row=slot_order // k,
        rows=Bags(bag_index, offsets, valid_pos // k),
        gates=meta[:, k:].reshape(-1).index_select(0, slot_order),
        local_counts=local_counts,
    )


def rows_with_meta(x: torch.Tensor, meta: torch.Tensor, r: Route) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to send along route `r`, and beside them each row's slot metadata (one hop moves both)."""
    return gather_rows(x, r.pair_row, r.rows), gather_rows(meta, r.pair_row, r.rows)


def unpack_for_experts(
    rows: torch.Tensor, meta: torch.Tensor, first_expert: int, per_rank: int, r: Route
) -> tuple[Slots, torch.Tensor]:
    """Received rows -> the slots this rank's experts serve, and one row per slot sorted by local expert
    (the slot count and rows per expert came with `r`'s count exchange: no host sync)."""
    slots = receiver_slots(meta, first_expert, per_rank, r.recv_slots, r.recv_key_counts)
    return slots, expand_to_slots(rows, slots)


def expand_to_slots(rows: torch.Tensor, slots: Slots) -> torch.Tensor:
    """Received rows -> one row per slot served here, sorted by local expert (for the grouped GEMM)."""
    return gather_rows(rows, slots.slot_row, slots.rows)


def slot_sums(y: torch.Tensor, slots: Slots, gates: torch.Tensor | None = None) -> torch.Tensor:
    """Each received row's sum over its slots' expert rows, weighted by `gates` (the slots' gates, where the
    experts did not weigh them), fp32 inside, y's dtype out: what one row carries back. One pass over the M
    slot rows (`bag_sum`)."""
    return bag_sum(y, slots.rows, slots.slot_row, gates)


def sum_over_route(back: torch.Tensor, r: Route) -> torch.Tensor:
    """Rows returned along route `r` -> one row per source row: the sum over its peers, in peer order."""
    return bag_sum(back, r.rows, r.pair_row)

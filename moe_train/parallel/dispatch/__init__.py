"""Expert-parallel dispatchers and their registry: the one place a dispatcher is added.

A dispatcher implements the phased protocol of `moe_train.model.dispatch.Dispatcher` (plan, dispatch
start/wait, combine start/wait, each yielding the ops of `moe_train.model.phases`); the eager forward, the
overlap engine and inference run it unchanged. `DISPATCHERS` maps `parallel.dispatcher` names to a factory
that builds one for a MoE layer on this rank's mesh; a factory may refuse a layout by raising `ValueError`
(the start-up layout checks call it through `check_dispatcher`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ...config import ConfigError
from ...model.dispatch import Dispatcher
from ..mesh import Layout, Mesh, check_expert_groups
from .board import Board, GatherBoard, SymmBoard
from .bounded import BoundedDispatcher
from .counters import CommCounters
from .direct import DirectDispatcher
from .flat import AllToAllDispatcher
from .hierarchical import HierarchicalDispatcher
from .symm import TRANSPORTS, BlockTransport, transport_missing


@dataclass(frozen=True)
class DispatchOptions:
    """What every factory gets beside the mesh: byte and overflow counters, the exchange-order log (tests),
    FP8 dispatch rows, `parallel.dispatch_bound` and the symmetric-memory transport of the fixed-size blocks
    (None: the all-to-all)."""

    counters: CommCounters | None = None
    event_log: list[str] | None = None
    fp8_rows: bool = False
    bound: float | None = None
    transport: BlockTransport | Board | None = None


def _ep_peer_nodes(mesh: Mesh) -> list[int]:
    group_ranks = next(g for g in mesh.layout.ep_groups() if mesh.rank in g)
    return [mesh.layout.node_of(r) for r in group_ranks]


def _flat(mesh: Mesh, o: DispatchOptions) -> Dispatcher:
    ep, ep_rank, peers = mesh.layout.ep, mesh.ep_rank, _ep_peer_nodes(mesh)
    return AllToAllDispatcher(mesh.group("ep"), ep, ep_rank, o.counters, peers, o.event_log, o.fp8_rows)


def _bounded(mesh: Mesh, o: DispatchOptions) -> Dispatcher:
    ep, ep_rank, peers = mesh.layout.ep, mesh.ep_rank, _ep_peer_nodes(mesh)
    group = mesh.group("ep")
    return BoundedDispatcher(
        group, ep, ep_rank, o.counters, peers, o.event_log, o.fp8_rows, o.bound, o.transport
    )


def _direct(mesh: Mesh, o: DispatchOptions) -> Dispatcher:
    ep, ep_rank, peers = mesh.layout.ep, mesh.ep_rank, _ep_peer_nodes(mesh)
    group = mesh.group("ep")
    board = o.transport if isinstance(o.transport, Board) else None
    return DirectDispatcher(group, ep, ep_rank, o.counters, peers, o.event_log, o.fp8_rows, o.bound, board)


def _hierarchical(mesh: Mesh, o: DispatchOptions, bounded_intra: bool = False) -> Dispatcher:
    nodes, local = mesh.layout.ep_node_shape()
    inter, intra = mesh.group("inter_node"), mesh.group("intra_node")
    return HierarchicalDispatcher(
        inter,
        intra,
        nodes,
        local,
        mesh.ep_node_rank,
        mesh.local_ep_rank,
        o.counters,
        [mesh.layout.node_of(r) for r in dist.get_process_group_ranks(inter)],
        [mesh.layout.node_of(r) for r in dist.get_process_group_ranks(intra)],
        o.event_log,
        o.fp8_rows,
        bounded_intra,
        o.bound,
        o.transport if bounded_intra else None,
    )


def _hierarchical_bounded(mesh: Mesh, o: DispatchOptions) -> Dispatcher:
    """Stage 1 (between nodes) as `hierarchical`; stage 2 (inside the node) in fixed-size blocks."""
    return _hierarchical(mesh, o, bounded_intra=True)


def _check_hierarchical(layout: Layout, n_experts: int, n_group: int) -> None:
    """Whole expert groups per node, else node-limited routing would not limit nodes."""
    check_expert_groups(layout, n_experts, n_group)


# (mesh, options) -> a dispatcher
DispatcherFactory = Callable[[Mesh, DispatchOptions], Dispatcher]

# name -> (factory, layout check(layout, n_experts, n_group) or None)
DISPATCHERS: dict[str, tuple[DispatcherFactory, Callable[[Layout, int, int], None] | None]] = {
    "alltoall": (_flat, None),
    "bounded": (_bounded, None),
    "direct": (_direct, None),
    "hierarchical": (_hierarchical, _check_hierarchical),
    "hierarchical_bounded": (_hierarchical_bounded, _check_hierarchical),
}
# the dispatchers with fixed-size buffers (whole, or the intra-node stage), the only ones
# `parallel.dispatch_bound` applies to; and those a symmetric-memory `parallel.dispatch_transport` moves
BOUNDED = ("bounded", "hierarchical_bounded", "direct")
TRANSPORTED = ("bounded", "hierarchical_bounded", "direct")
# the transports the direct dispatcher reads through (a board, board.py), beside its all-to-all twin
BOARDS: dict[str, type[Board]] = {"peer_write": SymmBoard, "collective": GatherBoard}


def transport_refused(name: str, dispatcher: str) -> str | None:
    """Why `parallel.dispatch_transport=name` cannot move `dispatcher`'s rows (None: it can)."""
    if name == "alltoall":
        return None
    if dispatcher not in TRANSPORTED:
        return f"alltoall unless parallel.dispatcher is one of {', '.join(TRANSPORTED)}"
    if dispatcher == "direct" and name not in BOARDS:
        return f"one of alltoall, {', '.join(BOARDS)} with parallel.dispatcher=direct"
    return None


def build_transport(name: str, mesh: Mesh, dispatcher: str = "bounded") -> BlockTransport | Board | None:
    """The transport of `parallel.dispatch_transport` for `dispatcher` on this rank, shared by its layers:
    `bounded`'s blocks over the ep group, `hierarchical_bounded`'s stage 2 over the node's ep ranks, or the
    direct dispatcher's board over the ep group; None for the all-to-all, or where that group has one rank
    (nothing moves). ConfigError naming the key where it cannot run."""
    make = TRANSPORTS[name]
    if make is None:
        return None
    missing = transport_missing(name, mesh.device)
    if missing is not None:
        raise ConfigError(f"parallel.dispatch_transport={name} is not allowed here: {missing}")
    if mesh.layout.ep == 1:
        return None
    if dispatcher == "direct":
        return BOARDS[name](mesh.group("ep"), mesh.device)
    if dispatcher == "hierarchical_bounded":
        local = mesh.layout.ep_node_shape()[1]
        return make(mesh.group("intra_node"), mesh.device) if local > 1 else None
    return make(mesh.group("ep"), mesh.device)


def check_dispatcher(name: str, layout: Layout, n_experts: int, n_group: int) -> None:
    """Whether dispatcher `name` exists and can serve this layout (ValueError naming what is allowed)."""
    if name not in DISPATCHERS:
        raise ValueError(f"parallel.dispatcher={name!r} is not allowed: one of {', '.join(DISPATCHERS)}")
    check = DISPATCHERS[name][1]
    if check is not None and layout.ep > 1:
        check(layout, n_experts, n_group)


def build_dispatcher(
    name: str,
    mesh: Mesh,
    counters: CommCounters | None = None,
    event_log: list[str] | None = None,
    fp8_rows: bool = False,
    bound: float | None = None,
    transport: BlockTransport | None = None,
) -> Any:
    """One dispatcher of kind `name` over this rank's ep group; `fp8_rows`: its dispatch rows travel as FP8
    tiles (`trainer.dtype=fp8`, parallel/comm.py); `bound`: a bounded dispatcher's buffers (bounded.py)."""
    return DISPATCHERS[name][0](mesh, DispatchOptions(counters, event_log, fp8_rows, bound, transport))


__all__ = [
    "DISPATCHERS",
    "BOARDS",
    "BOUNDED",
    "TRANSPORTED",
    "TRANSPORTS",
    "AllToAllDispatcher",
    "BoundedDispatcher",
    "CommCounters",
    "DirectDispatcher",
    "DispatchOptions",
    "HierarchicalDispatcher",
    "build_dispatcher",
    "build_transport",
    "transport_refused",
    "check_dispatcher",
]

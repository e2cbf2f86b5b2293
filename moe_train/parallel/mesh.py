"""The process mesh: one object, built once, that owns every process group and the device.

Rank order (outermost first): pipeline stage, expert-data-parallel replica, expert-parallel rank.
    rank = pp_rank · dp + edp_rank · ep + ep_rank,     dp = world / pp,  edp = dp / ep
Expert-parallel ranks are adjacent, so an ep group fills a node before it spans nodes (all-to-all stays on
the fast link where it can), and data-parallel peers of one stage are the contiguous block of its dp ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class MeshError(ValueError):
    """The world does not fit the requested layout; the message names the keys and what would fit."""


@dataclass(frozen=True)
class Layout:
    """Pure arithmetic of a layout (no process groups): testable without a world."""

    world: int
    pp: int
    ep: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.world % self.pp:
            raise MeshError(f"WORLD_SIZE={self.world} is not a multiple of parallel.pp={self.pp}")
        dp = self.world // self.pp
        if dp % self.ep:
            raise MeshError(
                f"parallel.ep={self.ep} must divide dp = WORLD_SIZE/parallel.pp = {self.world}/{self.pp} "
                f"= {dp} (experts are sharded across data-parallel ranks); allowed ep: {divisors(dp)}"
            )
        if self.gpus_per_node < 1:
            raise MeshError(f"parallel.gpus_per_node={self.gpus_per_node} must be >= 1")

    @property
    def dp(self) -> int:
        return self.world // self.pp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, edp_rank, ep_rank) of a global rank."""
        pp_rank, rest = divmod(rank, self.dp)
        edp_rank, ep_rank = divmod(rest, self.ep)
        return pp_rank, edp_rank, ep_rank

    def rank_of(self, pp_rank: int, edp_rank: int, ep_rank: int) -> int:
        return pp_rank * self.dp + edp_rank * self.ep + ep_rank

    def dp_groups(self) -> list[list[int]]:
        return [[p * self.dp + i for i in range(self.dp)] for p in range(self.pp)]

    def ep_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(p, e, i) for i in range(self.ep)] for p in range(self.pp) for e in range(self.edp)
        ]

    def edp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(p, e, i) for e in range(self.edp)] for p in range(self.pp) for i in range(self.ep)
        ]

    def pp_groups(self) -> list[list[int]]:
        return [[p * self.dp + i for p in range(self.pp)] for i in range(self.dp)]

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def ep_node_shape(self) -> tuple[int, int]:
        """(nodes one ep group spans, its ranks on each node).

        Hierarchical dispatch needs every node of an ep group to hold the same number of its ranks, so that
        "the rank with my local index on node b" exists: either the group fills whole nodes (ep a multiple
        of gpus_per_node) or it lies inside one node (gpus_per_node a multiple of ep).
        """
        g, ep = self.gpus_per_node, self.ep
        if ep % g == 0:
            return ep // g, g
        if g % ep == 0:
            return 1, ep
        raise MeshError(
            f"parallel.ep={ep} and parallel.gpus_per_node={g}: an ep group must fill whole nodes or fit in "
            "one (one of them a multiple of the other) for hierarchical dispatch"
        )

    def intra_node_groups(self) -> list[list[int]]:
        """For each ep group, its ranks on one node (fast link): stage 2 of hierarchical dispatch."""
        _, local = self.ep_node_shape()
        return [g[i : i + local] for g in self.ep_groups() for i in range(0, self.ep, local)]

    def inter_node_groups(self) -> list[list[int]]:
        """For each ep group, its ranks with the same local index on each node: stage 1 (slow link)."""
        nodes, local = self.ep_node_shape()
        return [[g[n * local + i] for n in range(nodes)] for g in self.ep_groups() for i in range(local)]


def check_expert_groups(layout: Layout, n_experts: int, n_group: int) -> None:
    """Node-limited routing only limits nodes if every node of an ep group holds whole expert groups.

    Experts are placed in order, `n_experts / ep` per ep rank, so node j of an ep group holds a contiguous
    block of `n_experts / nodes` experts; it is a whole number of groups iff `nodes` divides `n_group`.
    Then a token that may use `topk_group` groups reaches at most `topk_group` nodes.
    """
    nodes, local = layout.ep_node_shape()
    if n_group % nodes:
        raise MeshError(
            f"model.n_group={n_group} expert groups cannot be placed whole on the {nodes} nodes of an "
            f"ep group (parallel.ep={layout.ep}, parallel.gpus_per_node={layout.gpus_per_node}: "
            f"ranks per node: {local}): a group would be split across nodes; use n_group a multiple of "
            f"{nodes}, or ep / gpus_per_node such that an ep group spans a divisor of n_group nodes"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Mesh:
    layout: Layout
    rank: int
    local_rank: int
    device: torch.device
    backend: str | None
    groups: dict[str, Any] = field(default_factory=dict)  # name -> ProcessGroup (None when world == 1)

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def distributed(self) -> bool:
        return self.layout.world > 1

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def edp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def ep_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.edp_rank * self.layout.ep + self.ep_rank

    @property
    def ep_node_rank(self) -> int:
        """Index of this rank's node within its ep group (its rank in the inter-node group)."""
        return self.ep_rank // self.layout.ep_node_shape()[1]

    @property
    def local_ep_rank(self) -> int:
        """Index of this rank among its ep group's ranks on its node (its rank in the intra-node group)."""
        return self.ep_rank % self.layout.ep_node_shape()[1]

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def group(self, name: str) -> Any:
        return self.groups.get(name)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process groups: this mesh's subgroups newest first, then the default group, which takes
        every other group with it (the checkpoint writer's, the pipeline ties', DeepSpeed's). Every exit path
        calls it, so every rank tears down in the same order; left to interpreter exit, groups are destroyed
        in whatever order garbage collection reaches them while their background threads (gloo's, NCCL's
        watchdog) still run, which can abort a process that has finished its work."""
        if not dist.is_initialized():
            return
        world = dist.group.WORLD
        for name in reversed(list(self.groups)):
            g = self.groups.pop(name)
            if g is not None and g is not world:
                dist.destroy_process_group(g)
                log.debug("rank %d: destroyed process group %s", self.rank, name)
        self.groups.clear()
        dist.destroy_process_group()
        log.debug("rank %d: destroyed process group world", self.rank)


def _new_groups(all_groups: list[list[int]], rank: int, backend: str | None) -> Any:
    """Every rank must call new_group for every group, in the same order; keep the one holding `rank`."""
    mine = None
    for ranks in all_groups:
        g = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            mine = g
    return mine


def build_mesh(
    pp: int = 1,
    ep: int = 1,
    gpus_per_node: int | None = None,
    device: str = "auto",
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> Mesh:
    """Build from WORLD_SIZE/RANK/LOCAL_RANK (torchrun's variables); one process when they are absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    layout = Layout(world, pp, ep, gpus_per_node or local_world)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    mesh = Mesh(layout, rank, local_rank, dev, backend)
    if world == 1:
        return mesh
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    mesh.backend = backend
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    mesh.groups["world"] = dist.group.WORLD
    mesh.groups["dp"] = _new_groups(layout.dp_groups(), rank, backend)
    mesh.groups["ep"] = _new_groups(layout.ep_groups(), rank, backend)
    mesh.groups["edp"] = _new_groups(layout.edp_groups(), rank, backend)
    mesh.groups["pp"] = _new_groups(layout.pp_groups(), rank, backend)
    try:
        intra, inter = layout.intra_node_groups(), layout.inter_node_groups()
    except MeshError:  # irregular node shape: only hierarchical dispatch needs these, and it says so
        return mesh
    mesh.groups["intra_node"] = _new_groups(intra, rank, backend)
    mesh.groups["inter_node"] = _new_groups(inter, rank, backend)
    return mesh

"""Expert parallelism applied to a model built with its rank's expert slice.

The model itself is plain single-device math; this module only (1) tells `build_model` which experts a rank
holds and (2) swaps each MoE layer's local dispatcher for an all-to-all one over the mesh's ep group: flat
(`parallel.dispatcher=alltoall`) or two-stage node-aware (`hierarchical`, see parallel/hierarchical.py).
"""

from __future__ import annotations

from torch import nn

from ..model.moe import MoE, RoutedExperts
from .dispatch import AllToAllDispatcher, CommCounters
from .hierarchical import HierarchicalDispatcher
from .mesh import Mesh, check_expert_groups


def expert_slice(n_experts: int, mesh: Mesh) -> tuple[int, int] | None:
    """(first global expert, count) this rank holds; None when every rank holds all experts."""
    ep = mesh.layout.ep
    if ep == 1:
        return None
    per = n_experts // ep
    return mesh.ep_rank * per, per


def apply_expert_parallel(
    model: nn.Module,
    mesh: Mesh,
    counters: CommCounters | None = None,
    event_log: list[str] | None = None,
    dispatcher: str = "alltoall",
) -> None:
    """dispatcher: 'alltoall' (flat) or 'hierarchical'; the latter checks that no expert group of any MoE
    layer is split across nodes (else node-limited routing would not limit nodes)."""
    if mesh.layout.ep == 1:
        return
    ep_ranks = mesh.layout.ep_groups()
    group_ranks = next(g for g in ep_ranks if mesh.rank in g)
    peer_nodes = [mesh.layout.node_of(r) for r in group_ranks]
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        if dispatcher == "hierarchical":
            check_expert_groups(mesh.layout, m.n_experts, m.gate.n_group)
            m.dispatcher = HierarchicalDispatcher.from_mesh(mesh, counters, event_log)
        elif dispatcher == "alltoall":
            m.dispatcher = AllToAllDispatcher(
                mesh.group("ep"), mesh.layout.ep, mesh.ep_rank, counters, peer_nodes, event_log
            )
        else:
            raise ValueError(f"parallel.dispatcher={dispatcher!r}: one of alltoall, hierarchical")


def expert_param_names(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for mod_name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            out.update(f"{mod_name}.{n}" for n, _ in m.named_parameters(recurse=False))
    return out

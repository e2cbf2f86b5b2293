"""Expert parallelism applied to a model built with its rank's expert slice.

The model itself is plain single-device math; this module only (1) tells `build_model` which experts a rank
holds and (2) swaps each MoE layer's local dispatcher for an all-to-all one over the mesh's ep group: flat
(`parallel.dispatcher=alltoall`), flat with fixed-size buffers (`bounded`) or two-stage node-aware
(`hierarchical`, and `hierarchical_bounded` with its intra-node stage in fixed-size blocks), from the
registry in parallel/dispatch/.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..model.moe import MoE, RoutedExperts
from .dispatch import CommCounters, build_dispatcher, build_transport, check_dispatcher
from .mesh import Mesh


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
    fp8_rows: bool = False,
    bound: float | None = None,
    transport: str = "alltoall",
) -> None:
    """Give every MoE layer a dispatcher of kind `dispatcher` (see `parallel.dispatch.DISPATCHERS`) over the
    mesh's ep group; the layout checks of that kind run first. fp8_rows: dispatch rows travel in FP8;
    bound, transport: `parallel.dispatch_bound` and `parallel.dispatch_transport` (one transport, and its
    buffers, for all the layers)."""
    shared = build_transport(transport, mesh, dispatcher)
    if mesh.layout.ep == 1:
        return
    for m in model.modules():
        if isinstance(m, MoE):
            check_dispatcher(dispatcher, mesh.layout, m.n_experts, m.gate.n_group)
            m.dispatcher = build_dispatcher(dispatcher, mesh, counters, event_log, fp8_rows, bound, shared)


def expert_param_names(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for mod_name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            out.update(f"{mod_name}.{n}" for n, _ in m.named_parameters(recurse=False))
    return out


@contextlib.contextmanager
def exact_dispatch(model: nn.Module) -> Iterator[None]:
    """Inside, the bounded dispatchers of `model` take their exact, host-synced path: how a step or an
    evaluation whose fixed-size buffers overflowed runs again (parallel/dispatch/bounded.py)."""
    bounded = [m.dispatcher for m in model.modules() if isinstance(m, MoE) and hasattr(m.dispatcher, "exact")]
    for d in bounded:
        d.exact = True
    try:
        yield
    finally:
        for d in bounded:
            d.exact = False

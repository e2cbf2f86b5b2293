"""A step's numbers over the whole global batch: loss terms, expert loads and all-to-all bytes summed over
every rank. Every rank gets the same totals, so decisions taken from them (skip a non-finite step, move
the selection biases) are the same everywhere."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..balance import maxvio
from ..parallel.dispatch import CommCounters
from ..parallel.mesh import Mesh

K = TypeVar("K")

COMM_KEYS = tuple(
    f"{d}{s}" for d in ("dispatch", "combine") for s in ("", "_remote", "_intra_node", "_inter_node")
)


class Totals:
    """Sums over every rank: each holds a share of the batch (dp) and of the layers (pp), and the last
    pipeline stage alone sees the LM loss, so the world group covers every layout."""

    def __init__(self, mesh: Mesh, moe_layers: list[int], n_experts: int) -> None:
        self.mesh, self.moe_layers, self.n_experts = mesh, moe_layers, n_experts

    def values(self, values: list[float], op: Any = dist.ReduceOp.SUM) -> list[float]:
        """Each value summed (or reduced by `op`) over every rank."""
        if not self.mesh.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.mesh.device)
        dist.all_reduce(t, op=op, group=self.mesh.group("world"))
        return t.tolist()

    def loads(self, counts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Rows per expert of the whole global batch for every MoE layer (layers without records: zeros)."""
        if not self.mesh.distributed:
            return counts
        layers = self.moe_layers
        t = torch.zeros(len(layers), self.n_experts, dtype=torch.long, device=self.mesh.device)
        for i, k in enumerate(layers):
            if k in counts:
                t[i] = counts[k].to(self.mesh.device)
        dist.all_reduce(t, group=self.mesh.group("world"))
        host = t.cpu()  # one copy: a copy per layer would wait on the device once per layer
        return {k: host[i] for i, k in enumerate(layers)}

    def overflowed(self, counters: CommCounters) -> bool:
        """Whether a bounded dispatcher's buffers overflowed on any rank since the last call; every rank
        calls it while one is in use (a rank without MoE layers adds nothing)."""
        over = counters.take_overflows()
        return self.values([0.0 if over is None else float(over)])[0] > 0

    def comm_bytes(self, counters: CommCounters) -> dict[str, float]:
        """Expert all-to-all bytes since the last call (nothing with ep = 1)."""
        if self.mesh.layout.ep == 1:
            return {}
        got = counters.take()
        totals = self.values([float(got.get(k, 0)) for k in COMM_KEYS])
        return {f"a2a_{k}_bytes": v for k, v in zip(COMM_KEYS, totals, strict=True)}


def on_host(counts: dict[K, torch.Tensor]) -> dict[K, torch.Tensor]:
    """Loads (one vector per key: a layer, or a (step, layer) pair) on the host, in one copy: one wait on the
    device, not one per vector."""
    if not counts:
        return {}
    keys = sorted(counts)
    host = torch.stack([counts[k] for k in keys]).cpu()
    return dict(zip(keys, host, strict=True))


def maxvio_record(counts: dict[int, torch.Tensor], key: str) -> dict[str, Any]:
    """MaxVio per MoE layer of these loads and their mean, as `<key>` and `<key>_per_layer`."""
    keys = sorted(counts)
    values = maxvio(torch.stack([counts[k] for k in keys])).tolist() if keys else []
    per_layer = {str(k): v for k, v in zip(keys, values, strict=True)}
    return {
        key: float(np.mean(list(per_layer.values()))) if per_layer else 0.0,
        f"{key}_per_layer": per_layer,
    }

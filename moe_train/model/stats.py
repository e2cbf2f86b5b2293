"""A per-forward collector of router statistics and balance-loss terms.

The trainer creates one per micro-batch and passes it into the model; MoE layers append to it.  Passing it
explicitly (instead of stashing values on modules or in globals) lets pipeline stages, recomputation and
evaluation each own their records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RouterRecord:
    layer: int  # global layer index (the MTP block counts after the last decoder layer)
    counts: torch.Tensor  # (n_routed_experts,) tokens routed to each expert, int64, no grad
    balance_loss: (
        torch.Tensor | None
    )  # scalar with grad (seq-wise or batch-wise term), already scaled by alpha


@dataclass
class MoEStats:
    records: list[RouterRecord] = field(default_factory=list)

    def add(self, record: RouterRecord) -> None:
        self.records.append(record)

    def balance_loss(self) -> torch.Tensor | None:
        terms = [r.balance_loss for r in self.records if r.balance_loss is not None]
        return torch.stack(terms).sum() if terms else None

    def counts_by_layer(self) -> dict[int, torch.Tensor]:
        """Sum the counts of every record of each layer (several forwards may share one collector)."""
        out: dict[int, torch.Tensor] = {}
        for r in self.records:
            out[r.layer] = out[r.layer] + r.counts if r.layer in out else r.counts  # sums make new tensors
        return out

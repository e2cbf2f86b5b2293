"""The dispatcher seam: how routed tokens reach the experts and come back.

The MoE layer does routing and expert math; a dispatcher decides where the expert rows live.  The local
dispatcher (this file) keeps everything on one device; `moe_train.parallel.dispatch` provides all-to-all and
hierarchical ones with the same interface, so model code knows nothing of parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class LocalPlan:
    order: torch.Tensor  # (N*K,) permutation of the flattened (token, k) pairs, sorted by expert
    token_of: torch.Tensor  # (N*K,) source token of each sorted row
    weight: torch.Tensor  # (N*K,) gate weight of each sorted row (fp32)
    n_tokens: int


class Dispatcher(Protocol):
    """dispatch returns expert-sorted rows and the rows per *local* expert; combine undoes it."""

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, object]: ...

    def combine(self, y: torch.Tensor, plan: object) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts on this device: a stable sort by expert and a weighted scatter-add back."""

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, LocalPlan]:
        k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        counts = torch.bincount(flat, minlength=n_experts)
        plan = LocalPlan(order, token_of, topk_weight.reshape(-1)[order], x.shape[0])
        # Gather through a K-fold expand and a permutation rather than x[token_of]: the backward of a
        # permutation has no duplicate indices, so it is deterministic on CPU (x[token_of]'s is not).
        rows = x.unsqueeze(1).expand(x.shape[0], k, x.shape[1]).reshape(-1, x.shape[1])[order]
        return rows, counts, plan

    def combine(self, y: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        weighted = y.float() * plan.weight.unsqueeze(-1)
        out = torch.zeros(plan.n_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
        out.index_add_(0, plan.token_of, weighted)
        return out.to(y.dtype)

"""The dispatcher seam: how routed tokens reach the experts and come back.

The MoE layer does routing and expert math; a dispatcher decides where the expert rows live.  The local
dispatcher (this file) keeps everything on one device; `moe_train.parallel.dispatch` provides all-to-all and
hierarchical ones with the same interface, so model code knows nothing of parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..ops.gather import Bags, bag_sum, gather_rows


@dataclass
class LocalPlan:
    token_of: torch.Tensor  # (N*K,) source token of each expert-sorted row
    tokens: Bags  # bag t = token t's K sorted rows, in k order (the inverse of token_of)
    weight: torch.Tensor  # (N*K,) gate weight of each (token, k) pair, in token order (fp32, with grad)
    sorted_weight: torch.Tensor  # (N*K,) the same weights in expert-sorted order (no grad)


def expert_counts(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows routed to each expert, (n_experts,) int64, without a host sync.

    `torch.bincount` reads the largest index back to the host to size its output, which stalls the CUDA
    stream twice per MoE layer; an integer scatter-add into a fixed-size vector does not (and is exact).
    """
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


class Dispatcher(Protocol):
    """dispatch returns expert-sorted rows and the rows per *local* expert; combine undoes it."""

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, object]: ...

    def combine(self, y: torch.Tensor, plan: object) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts on this device: a stable sort by expert, and back through the same permutation."""

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, LocalPlan]:
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        counts = expert_counts(flat, n_experts)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        dev = flat.device
        tokens = Bags(inverse, torch.arange(n + 1, device=dev) * k, torch.arange(n * k, device=dev) // k)
        weight = topk_weight.reshape(-1)
        plan = LocalPlan(token_of, tokens, weight, weight.detach()[order])
        # rows = x[token_of], but not through autograd's scatter-add backward (duplicate indices: atomics,
        # not deterministic): the backward sums each token's K rows, in k order.
        return gather_rows(x, token_of, tokens), counts, plan

    def combine(self, y: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        """Σ_k gate·row per token, in one pass over y (`bag_sum`: fp32 products and sum, y's dtype out).

        Why not a weighted index_add_ into the tokens: that made and kept (for backward) an fp32 copy of all
        N·K rows and added them with atomics. Why not gather to (N, K, H), multiply and sum over K (the
        previous version): on a GPU that writes and re-reads the N·K rows three times, the broadcast
        multiply through a slow generic kernel. Here each row is read once, the reduction over k runs in a
        fixed order (deterministic), and the backward is one scaled gather plus per-slot dot products.
        """
        return bag_sum(y, plan.tokens, plan.token_of, plan.weight, plan.sorted_weight)

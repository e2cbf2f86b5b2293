"""The dispatcher seam: how routed tokens reach the experts and come back.

The MoE layer does routing and expert math; a dispatcher decides where the expert rows live.  The local
dispatcher (this file) keeps everything on one device; `moe_train.parallel.dispatch` provides all-to-all and
hierarchical ones with the same interface, so model code knows nothing of parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .gather import gather_rows


@dataclass
class LocalPlan:
    order: torch.Tensor  # (N*K,) permutation of the flattened (token, k) pairs, sorted by expert
    token_of: torch.Tensor  # (N*K,) source token of each sorted row
    weight: torch.Tensor  # (N*K,) gate weight of each sorted row (fp32)
    n_tokens: int
    token_weight: torch.Tensor  # (N, K) the same gate weights in token order (fp32); combine uses these
    inverse: torch.Tensor  # (N*K,) position of each (token, k) pair in the sorted order (order's inverse)


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
        k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        counts = expert_counts(flat, n_experts)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        plan = LocalPlan(order, token_of, topk_weight.reshape(-1)[order], x.shape[0], topk_weight, inverse)
        # rows = x[token_of], but not through autograd's scatter-add backward (duplicate indices: atomics,
        # not deterministic): the backward gathers each token's K rows by `inverse` and sums them in k order.
        rows = gather_rows(x, token_of, inverse.view(-1, k))
        return rows, counts, plan

    def combine(self, y: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        """Scatter the rows back to (token, k) order through the permutation, then Σ_k gate·row.

        Why not a weighted index_add_ into the tokens: that made and kept (for backward) an fp32 copy of all
        N·K rows and added them with atomics, about 2 ms per layer on the 12-layer V2-Lite proxy. Here each
        row is moved once each way by a gather (forward by `inverse`, backward by `order`), the reduction
        over k runs in a fixed order (deterministic), and products are in y's dtype with fp32 accumulation
        in the sum (bf16 on GPU, as in DeepSeek-V3's reference MoE; unchanged fp32 on CPU).
        """
        n, k, hidden = plan.n_tokens, plan.token_weight.shape[-1], y.shape[-1]
        y_tok = gather_rows(y, plan.inverse, plan.order.view(-1, 1))
        return (y_tok.view(n, k, hidden) * plan.token_weight.to(y.dtype).unsqueeze(-1)).sum(1)

"""The dispatcher seam: how routed tokens reach the experts and come back, as phases.

The MoE layer routes and computes experts; a dispatcher decides where the expert rows live. It is a phased
object: `plan` (routing → which rows go where; may yield a `Prepare` for a count exchange the host reads),
`dispatch_start` / `dispatch_wait` (one or more exchange hops), `combine_start` / `combine_wait`. Each phase
is a program (model/phases.py) that yields `Compute`, `Issue`, `Wait` and `Prepare` ops, so the eager
forward, the overlap engine and inference run any dispatcher unchanged. A dispatcher keeps one layer call's
state on the plan object it returns; the MoE layer passes it to the later phases.

The local dispatcher (this file) keeps everything on one device; `moe_train.parallel.dispatch` registers the
all-to-all and hierarchical ones, so model code knows nothing of parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..ops.gather import Bags, bag_sum, gather_rows, sort_keys
from .phases import Compute, Program, done


def expert_counts(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows routed to each expert, (n_experts,) int64, without a host sync.

    `torch.bincount` reads the largest index back to the host to size its output, which stalls the CUDA
    stream twice per MoE layer; an integer scatter-add into a fixed-size vector does not (and is exact).
    """
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


class Dispatcher(Protocol):
    """Phases of moving (N, H) token rows to their top-k experts and the expert outputs back.

    plan(topk_idx, n_experts) -> plan; dispatch_start(plan, x, topk_weight) -> handle, after which the
    caller may compute; dispatch_wait(plan, handle) -> (expert-sorted rows, rows per local expert, each
    row's gate weight (fp32, carrying the router's gradient)); combine_start(plan, y, gates) -> handle;
    combine_wait(plan, handle) -> (N, H), each token's sum of its experts' rows, each weighted by its gate:
    by the experts (then `gates` is None: they weigh in their activation, a pass they make anyway) or by the
    combine (`gates` given: the rows' gates, as dispatch_wait returned them). Every phase is a program
    (yields ops, returns the value).

    An optional attribute, read by inference through `getattr`: `serves_expert_slice` (True: it serves a
    model that holds only some experts, e.g. parallel/tensor.py's).
    """

    def plan(self, topk_idx: torch.Tensor, n_experts: int) -> Program: ...

    def dispatch_start(self, plan: Any, x: torch.Tensor, topk_weight: torch.Tensor) -> Program: ...

    def dispatch_wait(self, plan: Any, handle: Any) -> Program: ...

    def combine_start(self, plan: Any, y: torch.Tensor, gates: torch.Tensor | None = None) -> Program: ...

    def combine_wait(self, plan: Any, handle: Any) -> Program: ...


@dataclass
class LocalPlan:
    token_of: torch.Tensor  # (N*K,) source token of each expert-sorted row
    tokens: Bags  # bag t = token t's K sorted rows, in k order (the inverse of token_of)
    order: torch.Tensor  # (N*K,) (token, k) position of each expert-sorted row
    counts: torch.Tensor  # (E,) rows per expert
    gates: torch.Tensor | None = None  # (N*K,) gate weight of each expert-sorted row (with grad), once sorted


class LocalDispatcher:
    """All experts on this device: a stable sort by expert, and back through the same permutation."""

    def plan(self, topk_idx: torch.Tensor, n_experts: int) -> Program:
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = sort_keys(flat, n_experts)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        dev = flat.device
        tokens = Bags(inverse, torch.arange(n + 1, device=dev) * k, torch.arange(n * k, device=dev) // k)
        return done(LocalPlan(order // k, tokens, order, expert_counts(flat, n_experts)))

    def dispatch_start(self, plan: LocalPlan, x: torch.Tensor, topk_weight: torch.Tensor) -> Program:
        def sort(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # rows = x[token_of], but not through autograd's scatter-add backward (duplicate indices:
            # atomics, not deterministic): the backward sums each token's K rows, in k order. The gates are
            # a permutation (each index once), so theirs is exact in any order.
            return gather_rows(x, plan.token_of, plan.tokens), w.reshape(-1).index_select(0, plan.order)

        rows, plan.gates = yield Compute("sort", sort, (x, topk_weight), join=True)
        return rows

    def dispatch_wait(self, plan: LocalPlan, handle: torch.Tensor) -> Program:
        return done((handle, plan.counts, plan.gates))

    def combine_start(self, plan: LocalPlan, y: torch.Tensor, gates: torch.Tensor | None = None) -> Program:
        return done((y, gates))

    def combine_wait(self, plan: LocalPlan, handle: tuple[torch.Tensor, torch.Tensor | None]) -> Program:
        """Σ_k (gate·)row per token, in one pass over y (`bag_sum`: fp32 products and sum, y's dtype out).

        Why not an index_add_ into the tokens: atomics, and on CPU a thread-dependent order. Why not gather
        to (N, K, H) and sum over K: on a GPU that writes and re-reads the N·K rows. Here each row is read
        once, the reduction over k runs in a fixed order (deterministic), and the backward is one gather
        (scaled, plus per-row dot products for the gates, where the combine weighs).
        """

        def total(y: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
            return bag_sum(y, plan.tokens, plan.token_of, gates)

        return (yield Compute("sum", total, handle, join=True))

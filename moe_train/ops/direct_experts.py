"""Routed experts for a few token rows: each (token, choice) pair straight from its expert's weights.

The grouped path (ops/grouped_gemm.py) sorts the rows by expert, runs one grouped GEMM per projection and
sums each token's outputs back, which is a dozen or more small kernels a layer around two GEMMs. At decode a
layer holds one row per sequence, so those launches, not the weight reads, bound the step. Here a pair's
projections are products with its expert's weight slice, `w[topk_idx] * x`, summed over the input dim.
Under `torch.compile` the indexing fuses into the reductions' loads: no weight is copied, every chosen
expert's weights are read once per pair, and the gate-weighted sum over a token's choices joins the last
reduction, a few kernels in all. The two stages, `direct_hidden` and `direct_down`, are compiled apart: in
one graph Inductor fuses silu(g)·u into the down reduction's loads and recomputes it for every one of its H
output rows, where apart the (N, K, I) activation is written once and read back. Run uncompiled,
`w[topk_idx]` copies each chosen expert: correct (the CPU tests hold it to the grouped path), never fast.

A weight is read once per pair that chose its expert, where the grouped GEMM reads it once per layer; so
this is for rows·top-k at most about half the experts (`direct_rows`). Deterministic: fixed-shape
reductions, no atomics.
"""

from __future__ import annotations

import torch

from .fused import swiglu_plain


def direct_rows(n_experts: int, top_k: int) -> int:
    """Token rows up to which the direct path serves a layer: rows·top-k pairs at most half the
    experts, so the pairs' weight reads stay below the grouped GEMM's (one read of every chosen expert)
    by a margin that pays for its sort, gathers and sums."""
    return max(1, n_experts // (2 * top_k))


def direct_hidden(x: torch.Tensor, topk_idx: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """x: (N, H) token rows; topk_idx: (N, K) chosen experts; w_gate_up: (E, 2I, H) → (N, K, I), each
    pair's silu(gate_proj x) · up_proj x in x's dtype, as the grouped path's activation is."""
    gu = (w_gate_up[topk_idx] * x[:, None, None, :]).sum(-1)  # (N, K, 2I)
    g, u = gu.chunk(2, dim=-1)
    return swiglu_plain(g, u).to(x.dtype)


def direct_down(
    h: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """h: (N, K, I) from `direct_hidden`; topk_weight: (N, K) gates; w_down: (E, H, I) → (N, H),
    Σ_k gate_k · down_k h_k in h's dtype, the sum over choices in fp32."""
    y = (w_down[topk_idx] * h[:, :, None, :]).sum(-1)  # (N, K, H)
    return (y.float() * topk_weight[..., None]).sum(1).to(h.dtype)

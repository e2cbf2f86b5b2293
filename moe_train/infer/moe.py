"""DeepSeekMoE for inference: the router as trained (the selection bias applies), none of training's extras.

No router statistics, no balance loss, no expert-parallel dispatcher (expert parallelism is a training
layout).  Two ways to run the chosen experts, the same math:

- *grouped* (CUDA, bf16): rows sorted by expert on the device and one `torch._grouped_mm` per projection,
  with the per-expert row counts kept on the device.  Nothing is read back to the host, so the step is
  fixed-shape and sync-free, which is what a CUDA graph needs; empty experts cost no weight reads.
- *looped* (CPU, fp32): each selected expert runs once over the rows routed to it.  At decode a handful of
  tokens touch a handful of experts, so looping over the experts actually chosen reads only their weights —
  the memory-bound part of an MoE step.  It reads the counts on the host (one sync per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.dispatch import LocalDispatcher
from ..model.moe import MoE
from ..ops.grouped_gemm import expert_swiglu, grouped_mm_available
from ..ops.swiglu import swiglu_act


def grouped_experts(x: torch.Tensor) -> bool:
    """Whether `moe_forward` takes the grouped, sync-free path for activations like x."""
    return grouped_mm_available(x) and x.dtype == torch.bfloat16


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE block's output for x (B, T, H); the model must hold all routed experts (one process)."""
    experts = moe.experts
    if experts.first_expert != 0 or experts.num_local != moe.n_experts:
        raise ValueError("inference needs every routed expert in this process (build without expert_slice)")
    B, T, H = x.shape
    flat = x.reshape(-1, H)
    routing = moe.gate(flat)
    if grouped_experts(flat):
        dispatcher = LocalDispatcher()  # training's local sort and combine: no host sync
        rows, counts, plan = dispatcher.dispatch(flat, routing.topk_idx, routing.topk_weight, moe.n_experts)
        out = expert_swiglu(rows, counts, experts.gate_up_proj, experts.down_proj, impl="grouped")
        y = dispatcher.combine(out, plan)
    else:
        y = _looped(moe, flat, routing.topk_idx, routing.topk_weight)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    return y.view(B, T, H)


def _looped(moe: MoE, flat: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    experts = moe.experts
    H = flat.shape[-1]
    k = topk_idx.shape[1]
    pairs = topk_idx.reshape(-1)  # (token, k) pairs, token-major
    order = pairs.argsort(stable=True)
    counts = torch.bincount(pairs, minlength=moe.n_experts).tolist()  # one host sync per layer
    rows_out = flat.new_zeros(pairs.numel(), H)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start : start + n]
        start += n
        g, u = F.linear(flat[sel // k], experts.gate_up_proj[e]).chunk(2, dim=-1)
        rows_out[sel] = F.linear(swiglu_act(g, u), experts.down_proj[e])
    # Σ_k gate·row in k order, as training's combine does, so a token's sum does not depend on its batch
    w = topk_weight.to(flat.dtype).unsqueeze(-1)
    return (rows_out.view(-1, k, H) * w).sum(1)

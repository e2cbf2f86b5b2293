"""DeepSeekMoE for inference: the router as trained (the selection bias applies), none of training's extras.

No router statistics, no balance loss, no dispatcher (expert parallelism is a training layout): each selected
expert runs once over the rows routed to it.  At decode a handful of tokens touch a handful of experts, so
looping over the experts actually chosen reads only their weights — the memory-bound part of an MoE step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.mlp import swiglu_act
from ..model.moe import MoE


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE block's output for x (B, T, H); the model must hold all routed experts (one process)."""
    experts = moe.experts
    if experts.first_expert != 0 or experts.num_local != moe.n_experts:
        raise ValueError("inference needs every routed expert in this process (build without expert_slice)")
    B, T, H = x.shape
    flat = x.reshape(-1, H)
    routing = moe.gate(flat)
    k = routing.topk_idx.shape[1]
    pairs = routing.topk_idx.reshape(-1)  # (token, k) pairs, token-major
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
    w = routing.topk_weight.to(flat.dtype).unsqueeze(-1)
    y = (rows_out.view(-1, k, H) * w).sum(1)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    return y.view(B, T, H)

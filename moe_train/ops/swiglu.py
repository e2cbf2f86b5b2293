"""The SwiGLU activation, silu(gate)·up: one home for the dense MLP, the shared and the routed experts, so a
fused kernel replaces it in one place."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up

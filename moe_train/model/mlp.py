"""SwiGLU feed-forward: dense layers and the shared experts."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.fused import swiglu_act
from .recompute import Recomputable, maybe_checkpoint


class SwiGLU(Recomputable, nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Selective recomputation keeps gate and up but not silu(gate), recomputed in backward.
        selective = self.recompute == "selective" and self.training
        return self.down_proj(maybe_checkpoint(selective, swiglu_act, self.gate_proj(x), self.up_proj(x)))

"""RMSNorm, computed in fp32 whatever the activation dtype (as DeepSeek-V3 and transformers do)."""

from __future__ import annotations

import torch
from torch import nn

from .recompute import Recomputable, maybe_checkpoint


class RMSNorm(Recomputable, nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Selective recomputation: the fp32 copies and the rsqrt would otherwise stay saved for backward.
        return maybe_checkpoint(self.recompute == "selective" and self.training, self.compute, x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The norm itself, never checkpointed (for callers whose own checkpoint region includes it)."""
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(dtype)

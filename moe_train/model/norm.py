"""RMSNorm, computed in fp32 whatever the activation dtype (as DeepSeek-V3 and transformers do); the op itself
is `ops.fused.rms_norm` (torch's fused kernel on CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.fused import rms_norm
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
        return rms_norm(x, self.weight, self.eps)

"""`trainer.dtype=fp8`: DeepSeek-V3's FP8 recipe on a built model, in place (the math: ops/fp8.py).

The recipe runs the dense linears — attention projections, dense MLPs, shared experts, MTP's projection — and
the routed experts in FP8, and keeps the embedding, the output head, the gating and the attention core in
higher precision. A linear whose dims do not tile by 128 stays bf16. `convert_to_fp8` swaps the forward of
every eligible `nn.Linear` for the FP8 one (parameter names and dtypes unchanged, so checkpoints, masters and
optimizer state see nothing), has the routed experts compute their two projections as grouped FP8 GEMMs
(`ops.fp8_experts.expert_swiglu_fp8`) and keep their SwiGLU input as FP8 tiles for backward, and reports
the share of the recipe's GEMM multiply-adds that now run in FP8.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..ops.fp8 import fp8_eligible, fp8_linear, swiglu_fp8_cached
from .moe import MoE


@dataclass
class FP8Coverage:
    fp8: int  # forward multiply-adds per token of the GEMMs running in FP8
    eligible: int  # the same for every GEMM the recipe runs in FP8

    @property
    def share(self) -> float:
        return self.fp8 / self.eligible if self.eligible else 0.0


def _forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = fp8_linear(x, linear.weight)
    return y if linear.bias is None else y + linear.bias


def convert_to_fp8(model: nn.Module, cfg: ModelConfig) -> FP8Coverage:
    """Run every eligible dense linear of `model` in FP8, in place (the head stays as it is)."""
    fp8 = eligible = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        macs = m.in_features * m.out_features
        eligible += macs
        if fp8_eligible(m.in_features, m.out_features):
            m.forward = functools.partial(_forward, m)
            fp8 += macs
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    for m in model.modules():
        if isinstance(m, MoE):  # the routed experts: top-k of them per token
            macs = cfg.num_experts_per_tok * 3 * h * inter
            eligible += macs
            if fp8_eligible(h, inter):  # gate_up: K = hidden, N = 2·inter; down: K = inter, N = hidden
                m.experts.impl = "fp8"
                m.experts.act = swiglu_fp8_cached
                fp8 += macs
    return FP8Coverage(fp8, eligible)

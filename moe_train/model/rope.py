"""Rotary position embedding for MLA's decoupled key/query parts, with YaRN context extension.

Pairs are interleaved (dims 2i, 2i+1 rotate together), as in DeepSeek-V3's reference code; transformers'
DeepseekV3 permutes to halves first, which is the same rotation on the same weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.fused import rotate_pairs


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_correction_range(
    low_rot: float, high_rot: float, dim: int, base: float, max_pos: int
) -> tuple[int, int]:
    low = math.floor(_yarn_correction_dim(low_rot, dim, base, max_pos))
    high = math.ceil(_yarn_correction_dim(high_rot, dim, base, max_pos))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(
    dim: int, base: float, rope_scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the factor applied to cos/sin (YaRN's attention factor)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    if not rope_scaling:
        return inv.float(), 1.0
    factor = float(rope_scaling.get("factor", 1.0))
    orig = int(rope_scaling.get("original_max_position_embeddings", 4096))
    beta_fast = float(rope_scaling.get("beta_fast", 32))
    beta_slow = float(rope_scaling.get("beta_slow", 1))
    mscale = float(rope_scaling.get("mscale", 1.0))
    mscale_all = float(rope_scaling.get("mscale_all_dim", 0.0))
    low, high = _yarn_correction_range(beta_fast, beta_slow, dim, base, orig)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
    inv = inv / factor * (1 - extrapolate) + inv * extrapolate
    attn_factor = (
        yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        if mscale_all
        else yarn_mscale(factor, mscale)
    )
    return inv.float(), float(attn_factor)


def softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """1/sqrt(d), times YaRN's mscale(all_dim)^2 when the context is extended (DeepSeek-V3 reference)."""
    scale = qk_head_dim**-0.5
    if rope_scaling:
        m = yarn_mscale(
            float(rope_scaling.get("factor", 1.0)), float(rope_scaling.get("mscale_all_dim", 0.0))
        )
        scale = scale * m * m
    return scale


class RotaryTable(torch.nn.Module):
    """cos/sin for positions [0, max_pos); a non-persistent buffer so checkpoints do not carry it."""

    def __init__(self, dim: int, max_pos: int, base: float, rope_scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.dim, self.max_pos, self.base = dim, max_pos, base
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the tables on the buffers' device (shapes only on the meta device)."""
        device = self.cos.device
        if device.type == "meta":
            self.cos = torch.empty(self.max_pos, self.dim // 2, device=device)
            self.sin = torch.empty(self.max_pos, self.dim // 2, device=device)
            return
        inv, attn_factor = rope_frequencies(self.dim, self.base, self.rope_scaling)
        t = torch.arange(self.max_pos, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv.cpu())
        self.cos = (freqs.cos() * attn_factor).to(device)
        self.sin = (freqs.sin() * attn_factor).to(device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate the last dim of x ([..., T, dim]) by the angles of its positions (default 0..T-1)."""
        T = x.shape[-2]
        if positions is None:
            cos, sin = self.cos[:T], self.sin[:T]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        return rotate_pairs(x, cos, sin)

"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Queries go through an optional low-rank bottleneck (q_lora_rank); keys and values are reconstructed from a
kv_lora_rank latent, and a separate qk_rope_head_dim key part carries position and is shared by all heads.
Only the latent and the rope key need caching at inference, which is the reason for the design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.attention import document_attention
from .documents import Documents
from .norm import RMSNorm
from .recompute import Recomputable, maybe_checkpoint
from .rope import RotaryTable, softmax_scale

# The latent norms use a fixed eps, not rms_norm_eps: DeepSeek-V3's reference and hub code and transformers
# all build them with RMSNorm's default, so another rms_norm_eps would otherwise compute something else.
LATENT_NORM_EPS = 1e-6


class MLA(Recomputable, nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryTable) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.qk_head_dim = self.nope + self.rope
        self.v_head_dim = cfg.v_head_dim
        h = cfg.hidden_size
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.nope + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, h, bias=False)
        self.scale = softmax_scale(self.qk_head_dim, cfg.rope_scaling)
        # The rotary table is shared by all layers; held outside the module tree so it is neither a
        # parameter nor duplicated in state dicts.
        self._rotary = (rotary,)

    def _q_up(self, q_latent: torch.Tensor) -> torch.Tensor:
        return self.q_b_proj(self.q_a_layernorm.compute(q_latent))

    def _kv_up(self, latent: torch.Tensor) -> torch.Tensor:
        return self.kv_b_proj(self.kv_a_layernorm.compute(latent))

    def forward(self, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, T, H]; within each document of `docs`, at its RoPE positions."""
        B, T, _ = x.shape
        rotary = self._rotary[0]
        pos = None if docs is None or docs.positions is None else docs.positions.unsqueeze(1)
        # Selective recomputation: the up-projections behind the latent norms are recomputed from the
        # (small) latents, so their wide outputs' norm intermediates are not kept.
        selective = self.recompute == "selective" and self.training
        if self.q_lora_rank:
            q = maybe_checkpoint(selective, self._q_up, self.q_a_proj(x))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = rotary(q_pe, pos)

        kv_a = self.kv_a_proj_with_mqa(x)
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = maybe_checkpoint(selective, self._kv_up, latent)
        kv = kv.view(B, T, self.n_heads, self.nope + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_head_dim], dim=-1)
        k_pe = rotary(k_pe.unsqueeze(1), pos).expand(B, self.n_heads, T, self.rope)

        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        if docs is None or docs.single:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = document_attention(q, k, v, docs.mask(q.dtype), self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))

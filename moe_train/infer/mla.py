"""MLA against the latent cache: the plain path (keys/values rebuilt from the latent) and the absorbed path.

Both take new tokens x (B, T, H) at per-sequence `positions` (B, T), write their latent and rope key into
the cache, and attend to every cached token j <= the query's own position.  Positions, not a left-padding
mask, say where a token is: batched sequences of different lengths each start at position 0, so RoPE angles
and cache slots are exactly those of a one-by-one run.

Absorbed path (DeepSeek-V3 reference inference, "absorb" mode): with kv_b_proj split per head into W_UK
(nope × r) and W_UV (v × r), q_nope·k_nope = (W_UKᵀ q_nope)·c, so the query is folded into latent space and
scores are taken directly against the cached latent; the attention-weighted latent is lifted by W_UV
afterwards.  Per step that reads the r + d_R cache row once instead of n_h·(d_nope + d_v) rebuilt values,
which is the decode win.  The plain path does the matrix-matrix work of training's MLA and suits prefill.

These functions call the MLA module's submodules directly, so the model files need no inference hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.attention import MLA
from .cache import LayerCache


def _queries(attn: MLA, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_nope (B, T, n_h, d_nope), q_pe (B, T, n_h, d_R) rotated at `positions`)."""
    B, T, _ = x.shape
    if attn.q_lora_rank:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    else:
        q = attn.q_proj(x)
    q_nope, q_pe = q.view(B, T, attn.n_heads, attn.qk_head_dim).split([attn.nope, attn.rope], dim=-1)
    # the table rotates [..., T, d]: heads go in front of T, and positions gain a broadcast head axis
    q_pe = attn._rotary[0](q_pe.transpose(1, 2), positions.unsqueeze(1)).transpose(1, 2)
    return q_nope, q_pe


def _store_latent(
    attn: MLA, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache, check: bool
) -> None:
    latent, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.rope], dim=-1)
    cache.write(positions, attn.kv_a_layernorm(latent), attn._rotary[0](k_pe, positions), check)


def _mask(positions: torch.Tensor, keys: int) -> torch.Tensor:
    """(B, T, keys) bool: query at position p sees cache slots 0..p of its own sequence."""
    return torch.arange(keys, device=positions.device) <= positions.unsqueeze(-1)


def mla_attention(
    attn: MLA,
    x: torch.Tensor,
    positions: torch.Tensor,
    cache: LayerCache,
    absorb: bool,
    static: bool = False,
) -> torch.Tensor:
    """MLA output (B, T, hidden) for new tokens x; their rows of this layer's cache are written first.

    static=True reads every max_len slot of the cache (the mask hides the unused ones) and skips the
    bounds check, so nothing here reads a tensor on the host and every shape is fixed: the form a CUDA
    graph can capture.  Otherwise the read stops at the longest live sequence (one host sync).
    """
    B, T, _ = x.shape
    q_nope, q_pe = _queries(attn, x, positions)
    _store_latent(attn, x, positions, cache, check=not static)
    upto = cache.max_len if static else int(positions.max()) + 1
    latent, k_pe = cache.read(upto)
    latent, k_pe = latent.to(x.dtype), k_pe.to(x.dtype)
    mask = _mask(positions, upto)
    if absorb:
        o = _absorbed(attn, q_nope, q_pe, latent, k_pe, mask)
    else:
        o = _plain(attn, q_nope, q_pe, latent, k_pe, mask)
    return attn.o_proj(o.reshape(B, T, attn.n_heads * attn.v_head_dim))


def _plain(
    attn: MLA,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Rebuild per-head k_nope and v from the (already normalised) latent, then ordinary attention."""
    B, S, _ = latent.shape
    kv = attn.kv_b_proj(latent).view(B, S, attn.n_heads, attn.nope + attn.v_head_dim).transpose(1, 2)
    k_nope, v = kv.split([attn.nope, attn.v_head_dim], dim=-1)
    k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, attn.n_heads, S, attn.rope)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=attn.scale)
    return o.transpose(1, 2)


def _absorbed(
    attn: MLA,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Scores against the latent itself: W_UK folded into the query, W_UV applied after the weighting."""
    w = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope + attn.v_head_dim, attn.kv_lora_rank)
    w_uk, w_uv = w[:, : attn.nope], w[:, attn.nope :]
    q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
    scores = torch.einsum("bthc,bsc->bhts", q_lat, latent) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
    scores = scores.float() * attn.scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    p = scores.softmax(dim=-1).to(latent.dtype)
    o_lat = torch.einsum("bhts,bsc->bthc", p, latent)
    return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)

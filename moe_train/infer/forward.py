"""One model step over new tokens with a latent cache: prefill (many tokens) and decode (one) alike.

The layers' submodules are called directly (norms, MLA projections, MoE router and experts) rather than the
training forward, which knows nothing of caches, positions or stats-free routing.  MTP layers are not used:
they are a training signal (and a draft model for speculative decoding, not done here).
"""

from __future__ import annotations

import torch

from ..model.moe import MoE
from ..model.transformer import Transformer
from .cache import LatentCache
from .mla import mla_attention
from .moe import moe_forward


def new_cache(model: Transformer, batch: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
    """A cache for `batch` sequences of up to `max_len` tokens, in the attention weights' dtype by default."""
    ref = next(iter(model.layers.values())).self_attn.kv_a_proj_with_mqa.weight
    layers = [int(i) for i in model.layers]
    return LatentCache(model.cfg, layers, batch, max_len, dtype or ref.dtype, ref.device)


@torch.no_grad()
def forward_step(
    model: Transformer,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: LatentCache,
    absorb: bool,
) -> torch.Tensor:
    """Logits (B, T, vocab) of tokens `input_ids` (B, T) at `positions` (B, T); writes their cache rows.

    The caller advances `cache.lengths`; positions past a sequence's real end (padding) may write slots
    that later tokens overwrite before anything attends to them.
    """
    if not (model.is_first and model.is_last):
        raise ValueError("generation needs the whole model (not one pipeline stage)")
    h = model.embed_tokens(input_ids)
    for key, layer in model.layers.items():
        a = mla_attention(layer.self_attn, layer.input_layernorm(h), positions, cache, int(key), absorb)
        h = h + a
        x = layer.post_attention_layernorm(h)
        h = h + (moe_forward(layer.mlp, x) if isinstance(layer.mlp, MoE) else layer.mlp(x))
    return model.lm_head(model.norm(h))

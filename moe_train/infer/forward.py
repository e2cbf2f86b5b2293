"""One model step over new tokens with a latent cache: prefill (many tokens) and decode (one) alike.

Each layer runs the decoder block's own phases (`DecoderLayer.program`, model/phases.py) with one change: its
attention is MLA against the latent cache at explicit positions (infer/mla.py). The MoE phases are
training's, without what needs a training step: no router statistics, no balance loss, all experts local
(the local dispatcher); the selection bias applies. On CUDA with bf16 weights the routed experts take the
grouped, sync-free path (rows sorted on the device, one `torch._grouped_mm` per projection: what a CUDA
graph needs); elsewhere each selected expert runs once over its rows, which at decode reads only the
chosen experts' weights. MTP layers are not used: they are a training signal (and a draft model for
speculative decoding, not done here).

`InferenceModel` regroups a Transformer's modules for stepping — embedding, one `LayerStep` per decoder
layer, final norm and head — and owns no weights of its own.  Why a module per layer step: ZeRO-3 parameter
offload (infer/offload.py) gathers weights in module hooks.  A `LayerStep` marked as a ZeRO-3 leaf gathers
its whole layer when called (and the next layer is prefetched meanwhile), whatever the step reads inside:
the absorbed path reads kv_b_proj's weight directly, the looped experts index their weight tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.dispatch import LocalDispatcher
from ..model.phases import run
from ..model.transformer import DecoderLayer, Transformer
from .cache import LatentCache
from .mla import mla_attention


class LayerStep(nn.Module):
    """One decoder layer over new tokens at `positions`, writing their rows of `cache`."""

    def __init__(self, layer: DecoderLayer, layer_id: int) -> None:
        super().__init__()
        self.layer = layer
        self.layer_id = layer_id

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, cache: LatentCache, absorb: bool, static: bool
    ) -> torch.Tensor:
        attn, kv = self.layer.self_attn, cache.layer(self.layer_id)

        def attend(x: torch.Tensor) -> torch.Tensor:
            return mla_attention(attn, x, positions, kv, absorb, static)

        return run(self.layer.program(h, None, attend))


class InferenceModel(nn.Module):
    """A whole Transformer as a stepping module.

    `device` is where the step computes and `dtype` the cache's default (the attention weights' dtype);
    `offload` names where the weights live when ZeRO-Inference streams them (None: on `device`).
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        if not (model.is_first and model.is_last):
            raise ValueError("generation needs the whole model (not one pipeline stage)")
        for moe in model.moe_layers():
            # an expert slice is served only by a dispatcher made for it (parallel/tensor.py)
            if getattr(moe.dispatcher, "serves_expert_slice", False):
                continue
            if moe.experts.num_local != moe.n_experts or not isinstance(moe.dispatcher, LocalDispatcher):
                raise ValueError(
                    "inference needs every routed expert in this process (build without expert_slice), "
                    "or parallel.tensor.parallelize_for_decode for an expert-parallel slice"
                )
        self.cfg = model.cfg
        self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleList(LayerStep(layer, int(key)) for key, layer in model.layers.items())
        self.norm = model.norm
        self.lm_head = model.lm_head
        ref = self.layers[0].layer.self_attn.kv_a_proj_with_mqa.weight
        self.device: torch.device = ref.device
        self.dtype: torch.dtype = ref.dtype
        self.offload: str | None = None
        # ranks whose every forward is one collective call, whatever each one's inputs (weights spread
        # over them: infer/offload.py); `generate` keeps them stepping together. None: this process alone
        self.collective: dist.ProcessGroup | None = None
        self.eval()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        """A cache for `batch` sequences of up to `max_len` tokens (dtype: the attention weights')."""
        layers = [step.layer_id for step in self.layers]
        return LatentCache(self.cfg, layers, batch, max_len, dtype or self.dtype, self.device)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: LatentCache,
        absorb: bool,
        static: bool = False,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of tokens `input_ids` (B, T) at `positions` (B, T); writes their cache rows.

        The caller advances `cache.lengths`; positions past a sequence's real end (padding) may write slots
        that later tokens overwrite before anything attends to them.  static: see `mla_attention`.
        last (B,): only the logits at these token indices, (B, 1, vocab) — a prefill needs each row's last
        prompt token alone, and B·T·vocab logits would be the largest tensor of the step.
        """
        h = self.embed_tokens(input_ids)
        for step in self.layers:
            h = step(h, positions, cache, absorb, static)
        if last is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last].unsqueeze(1)
        return self.lm_head(self.norm(h))


def as_inference_model(model: Transformer | InferenceModel) -> InferenceModel:
    return model if isinstance(model, InferenceModel) else InferenceModel(model)


def new_cache(
    model: Transformer | InferenceModel, batch: int, max_len: int, dtype: torch.dtype | None = None
) -> LatentCache:
    """A cache for `batch` sequences of up to `max_len` tokens, in the attention weights' dtype by default."""
    return as_inference_model(model).new_cache(batch, max_len, dtype)


def forward_step(
    model: Transformer | InferenceModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: LatentCache,
    absorb: bool,
    static: bool = False,
) -> torch.Tensor:
    """`InferenceModel.forward` for a Transformer or an InferenceModel."""
    return as_inference_model(model)(input_ids, positions, cache, absorb, static)

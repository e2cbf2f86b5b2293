"""The MLA KV cache: per layer and per token only the normalised latent c_KV and the rotated rope key k_R.

This is what MLA was designed for: a standard MHA cache holds 2·n_h·d_h values per token per layer, MLA's
holds kv_lora_rank + qk_rope_head_dim (576 against 32768 for DeepSeek-V3).  The per-head keys and values
are never materialised by the absorbed decode path; the plain path re-derives them from the latent.

Buffers have a static shape (batch, max_len) allocated once, and each sequence writes its tokens at its
own positions 0..len-1 (no padding inside the cache).  Static shapes are what the CUDA-graph capture of
the decode step (infer/decode.py) needs; `lengths` is the only thing that changes between steps.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    """`kv[layer]`: (batch, max_len, kv_lora_rank + qk_rope_head_dim); the latent first, then the rope key.

    One buffer per layer (not two) so a token's cache row is one contiguous read in the memory-bound
    decode step.  `lengths[b]` counts the tokens of sequence b already written.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layers: list[int],
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.batch, self.max_len = batch, max_len
        width = self.kv_lora_rank + self.rope_dim
        self.kv = {i: torch.zeros(batch, max_len, width, dtype=dtype, device=device) for i in layers}
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.kv.values())).dtype

    def bytes_per_token_per_layer(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) × element size: what the cache costs per token and layer."""
        return (self.kv_lora_rank + self.rope_dim) * self.dtype.itemsize

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())

    def layer(self, i: int) -> LayerCache:
        """Layer i's buffer, to write and read its tokens."""
        return LayerCache(self.kv[i], self.kv_lora_rank)


class LayerCache:
    """One layer's cache buffer `kv` (batch, max_len, kv_lora_rank + qk_rope_head_dim).

    The attention takes this rather than (cache, layer index), so that a compiled attention sees the buffer
    as one more tensor argument and serves every layer from one graph, where an index would be a constant
    that recompiles it per layer.
    """

    def __init__(self, kv: torch.Tensor, kv_lora_rank: int) -> None:
        self.kv, self.kv_lora_rank = kv, kv_lora_rank

    @property
    def max_len(self) -> int:
        return self.kv.shape[1]

    def write(
        self, positions: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, check: bool = True
    ) -> None:
        """Store tokens at `positions` (batch, T) of each sequence; latent: (B, T, r), k_pe: (B, T, d_R).

        check=False skips the bounds check, which reads positions on the host: the static decode step
        cannot sync, and its caller sized the cache for every position it will write.
        """
        if check and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache's max_len={self.max_len}")
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)
        self.kv[rows, positions] = torch.cat([latent, k_pe], dim=-1).to(self.kv.dtype)

    def read(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent (B, upto, r), k_pe (B, upto, d_R)), views of the first `upto` slots of every sequence.

        Slicing to the longest live sequence keeps CPU decode proportional to the context; the static
        (graph-capturable) decode step reads all max_len slots and relies on the mask alone.
        """
        kv = self.kv[:, :upto]
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]


def mha_cache_elements(cfg: ModelConfig) -> int:
    """Values per token per layer of a standard MHA cache of the same heads: 2·n_h·d_h.

    d_h is the per-head dim of the DeepSeek-V2 paper's comparison, v_head_dim here (= qk_nope_head_dim in
    every preset); MHA would cache a key and a value per head.
    """
    return 2 * cfg.num_attention_heads * cfg.v_head_dim


def mla_cache_elements(cfg: ModelConfig) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim

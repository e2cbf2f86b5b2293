"""Causal attention within documents: a query attends to earlier keys of its own document only.

Three kernels with one meaning. On CUDA in half precision, cuDNN's ragged SDPA (ops/cudnn_attention.py)
where NVIDIA's cuDNN frontend is installed: every document is one entry of a ragged batch, in cuDNN's fused
kernel, with MLA's different query/key and value head dims. Otherwise on CUDA, FlexAttention
(`torch.nn.attention.flex_attention`, compiled) with a block mask: it skips key blocks of other documents
outright, so a sequence of many short documents costs less than one causal sequence. Elsewhere,
`scaled_dot_product_attention` with a dense boolean mask: the reference the CPU tests hold the others to.
A sequence that is one document needs none: the caller uses plain causal attention (cuDNN on CUDA).

A document is a run of equal ids in `ids` ([B, T], non-decreasing along T): the masks depend on nothing else.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .cudnn_attention import RaggedDocs, ragged_attention, unavailable_reason

# a dense bool mask [B, 1, T, T], FlexAttention's block mask, or the documents as cuDNN's ragged batch
Mask = torch.Tensor | BlockMask | RaggedDocs


def flex_available(device: torch.device) -> bool:
    return device.type == "cuda"


def ragged_available(device: torch.device, dtype: torch.dtype) -> bool:
    """cuDNN's ragged kernel (ops/cudnn_attention.py) serves `device` and `dtype` (half precision only)."""
    return dtype in (torch.bfloat16, torch.float16) and unavailable_reason(device) is None


def dense_mask(ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: True where query t may attend key s (s <= t, same document)."""
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    return ((ids[:, :, None] == ids[:, None, :]) & causal).unsqueeze(1)


def block_mask(ids: torch.Tensor, block: int = 128) -> Mask:
    """FlexAttention's block-sparse form of `dense_mask(ids)`, shared by every head.

    Built from each tile's first and last document id ([B, T/block]² work) instead of evaluating the mask
    at all T² pairs as `create_block_mask` does: documents are contiguous, so a key tile j <= query tile i
    holds an allowed pair iff its last id reaches the query tile's first, and every pair is allowed (a
    full tile: no mask evaluated inside) iff both tiles lie in one document and j < i."""
    B, T = ids.shape
    nb = -(-T // block)
    starts = torch.arange(nb, device=ids.device) * block
    first, last = ids[:, starts], ids[:, (starts + block).clamp(max=T) - 1]
    tiles = torch.arange(nb, device=ids.device)
    below = tiles[None, :] <= tiles[:, None]  # [q tile, kv tile]
    some = below & (last[:, None, :] >= first[:, :, None])
    full = below & (tiles[None, :] < tiles[:, None]) & (first[:, None, :] == last[:, :, None])
    full &= (starts + block <= T)[:, None]  # a query tile with padding rows stays partial, as flex's own
    # padded positions (T not a multiple of the tile) get id -1: the mask reads no index past T
    padded = F.pad(ids, (0, nb * block - T), value=-1)

    def same_document_causal(b, h, q, kv):
        return (padded[b, q] == padded[b, kv]) & (q >= kv)

    def listed(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)  # the tiles in m first
        return m.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    partial_n, partial_i = listed(some & ~full)
    full_n, full_i = listed(full)
    return BlockMask.from_kv_blocks(
        partial_n,
        partial_i,
        full_n,
        full_i,
        BLOCK_SIZE=block,
        mask_mod=same_document_causal,
        seq_lengths=(T, T),
    )


@functools.cache
def _compiled_flex():
    # flex_attention runs as a fused kernel only when compiled; eager flex is a reference loop
    return torch.compile(flex_attention, dynamic=False)


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float, compiled: bool = True
) -> torch.Tensor:
    """q, k: [B, H, T, d_qk]; v: [B, H, T, d_v]; mask: `dense_mask` or `block_mask` of the same ids, or
    their `RaggedDocs`. compiled=False runs a BlockMask through eager FlexAttention (the CPU tests' check of
    its meaning)."""
    if isinstance(mask, RaggedDocs):
        return ragged_attention(q, k, v, mask, scale)
    if isinstance(mask, BlockMask):
        fn = _compiled_flex() if compiled else flex_attention
        return fn(q, k, v, block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

"""The documents of packed sequences: which positions may attend to which, and their RoPE positions.

Corpora pack documents back to back, each ended by the end-of-document token, and training windows are cut
anywhere in that stream. With document masks a position attends only to earlier positions of its own
document, so a sequence of packed documents computes what each document alone would: the end-of-document
token closes its document (it is predicted from that document), and the token after it opens the next one.
RoPE positions may restart at each document's first token, as if each one began the sequence.

Built from a micro-batch's token ids, where those are on the host, so that nothing here waits on the GPU: the
trainer's executor makes one per micro-batch and every layer of every stage shares it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.attention import Mask, block_mask, dense_mask, flex_available, ragged_available
from ..ops.cudnn_attention import capacity_for, ragged_docs


def staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor bound for `device`, in page-locked memory where that is a CUDA device: a copy from
    pageable memory waits for the device to reach it, so the host could not issue a step ahead of the GPU."""
    if device.type != "cuda" or t.is_cuda or t.is_pinned():
        return t
    return t.pin_memory()


@dataclass
class Documents:
    """ids [B, T]: each position's document within its row (0 first, counting up). positions [B, T]: RoPE
    position within the document, or None for 0..T-1. single: every row is one document (or a piece of
    one), so plain causal attention computes the same and no mask is needed."""

    ids: torch.Tensor
    positions: torch.Tensor | None
    single: bool
    pairs: int = 0  # (query, key) pairs the mask allows, all rows: Σ L(L+1)/2 over documents (for MFU)
    capacity: int = 0  # cuDNN's ragged entries: at least the documents in all rows (counted on the host)
    _masks: dict[bool, Mask] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, tokens: torch.Tensor, eod_id: int, reset_positions: bool = True) -> Documents:
        """tokens: [B, T] input ids (on the host, where `single` is then read without a device sync)."""
        eod = (tokens == eod_id).to(torch.int32)
        ids = torch.cumsum(eod, 1, dtype=torch.int32) - eod  # an end-of-document token closes its own
        single = not bool(ids[:, -1].any())
        idx = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        opens = torch.zeros_like(eod, dtype=torch.bool)
        opens[:, 1:] = eod[:, :-1].bool()
        within = idx - torch.where(opens, idx, 0).cummax(1).values  # position within its document
        pairs = int(within.sum()) + within.numel()  # each query attends to itself and `within` earlier keys
        positions = within if reset_positions and not single else None
        capacity = capacity_for(int(ids[:, -1].sum()) + ids.shape[0])
        return cls(ids, positions, single, pairs, capacity)

    def to(self, device: torch.device) -> Documents:
        if self.ids.device == device:
            return self
        pos = None if self.positions is None else staged(self.positions, device).to(device, non_blocking=True)
        ids = staged(self.ids, device).to(device, non_blocking=True)
        return Documents(ids, pos, self.single, self.pairs, self.capacity)

    def prefix(self, n: int) -> Documents:
        """The first n positions of every row (a multi-token-prediction block's shorter sequence)."""
        pos = None if self.positions is None else self.positions[:, :n]
        return Documents(self.ids[:, :n], pos, self.single, capacity=self.capacity)  # no more documents

    @torch.compiler.disable  # built once, not a part of a compiled attention (that would specialise on it)
    def mask(self, dtype: torch.dtype) -> Mask:
        """The document-causal mask in the form the kernel for this device and `dtype` takes
        (ops/attention.py): cuDNN's ragged entries, FlexAttention's block mask or a dense mask; built once
        from the ids on their device (a CUDA graph rebuilds it from the ids it replays with) and shared by
        every layer."""
        ragged = self.capacity > 0 and ragged_available(self.ids.device, dtype)
        if ragged not in self._masks:
            if ragged:
                self._masks[ragged] = ragged_docs(self.ids, self.capacity)
            else:
                self._masks[ragged] = (block_mask if flex_available(self.ids.device) else dense_mask)(
                    self.ids
                )
        return self._masks[ragged]

    def same(self, k: int) -> torch.Tensor:
        """[B, T-k] bool: position i and position i+k lie in one document (an MTP depth-k target is
        predicted within its document only)."""
        return self.ids[:, k:] == self.ids[:, :-k]


def ragged_possible(device: torch.device) -> bool:
    """Whether `Documents.mask` may take cuDNN's ragged entries on `device` (with half-precision compute):
    where it may, a micro-batch's entries capacity shapes its work."""
    return ragged_available(device, torch.bfloat16)

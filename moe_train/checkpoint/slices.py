"""The part of a whole stored tensor that a rank's parameter holds, and reading only that part.

A model cut for tensor-parallel decode (parallel/tensor.py) keeps, of many parameters, a slice: along some
dims a subset of the whole tensor's indices, in runs of consecutive ones (a head block, the gate rows then
the up rows of an expert), and for the LM head some zero rows after them. Loaders cut the model first, on
the meta device, and then read just those runs: a safetensors slice, a view of a memory-mapped `model.pt`,
DCP read items narrowed to them (`SlicedLoadPlanner`). So a rank never materialises a whole tensor that it
keeps only part of, and the model is never gathered anywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Box = tuple[slice, ...]  # one slice per dim, each a run of consecutive indices


@dataclass
class TensorSlice:
    """Along each dim in `index`, the whole tensor's indices this tensor holds, in order; after them, along
    a dim in `pad`, that many zero entries (the LM head's last rank pads its rows to an equal share)."""

    index: dict[int, torch.Tensor] = field(default_factory=dict)
    pad: dict[int, int] = field(default_factory=dict)

    def cut(self, dim: int, index: torch.Tensor) -> TensorSlice:
        """This slice cut again along `dim` at `index` (indices into what it holds)."""
        index = index.cpu()
        held = self.index.get(dim)
        return TensorSlice({**self.index, dim: index if held is None else held[index]}, dict(self.pad))

    def padded(self, dim: int, count: int) -> TensorSlice:
        return TensorSlice(dict(self.index), {**self.pad, dim: self.pad.get(dim, 0) + count})

    def shifted(self, by: int) -> TensorSlice:
        """The same slice with every dim moved by `by` (-1: one expert's tensor of a fused [E, ...] one)."""
        return TensorSlice(
            {d + by: i for d, i in self.index.items()}, {d + by: n for d, n in self.pad.items()}
        )


def _runs(src: torch.Tensor, dst: torch.Tensor) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the maximal runs where src and dst both step by one."""
    if not len(src):
        return []
    breaks = ((src[1:] - src[:-1] != 1) | (dst[1:] - dst[:-1] != 1)).nonzero().flatten() + 1
    starts = [0, *breaks.tolist(), len(src)]
    return [(int(src[a]), int(dst[a]), b - a) for a, b in itertools.pairwise(starts)]


def blocks(
    whole: tuple[int, ...], sl: TensorSlice | None, box: dict[int, tuple[int, int]] | None = None
) -> list[tuple[Box, Box]]:
    """(source box, destination box) pairs that fill a tensor holding `sl` of a tensor shaped `whole`.

    box: {dim: (offset, length)} when the source is only that part of `whole` (one hub tensor of a fused
    parameter, such as an expert's gate rows): source boxes are then relative to it, and the destination
    receives only what falls inside it."""
    sl, box = sl or TensorSlice(), box or {}
    per_dim = []
    for d, size in enumerate(whole):
        off, length = box.get(d, (0, size))
        idx = sl.index.get(d)
        if idx is None:
            src, dst = torch.arange(length), torch.arange(off, off + length)
        else:
            pos = torch.arange(len(idx))
            inside = (idx >= off) & (idx < off + length)
            src, dst = idx[inside] - off, pos[inside]
        per_dim.append(_runs(src, dst))
    return [
        (
            tuple(slice(s, s + n) for s, _, n in combo),
            tuple(slice(t, t + n) for _, t, n in combo),
        )
        for combo in itertools.product(*per_dim)
    ]


@torch.no_grad()
def copy_slice(
    dest: torch.Tensor,
    read: Callable[[Box], torch.Tensor],
    whole: tuple[int, ...],
    sl: TensorSlice | None,
    box: dict[int, tuple[int, int]] | None = None,
) -> None:
    """Fill `dest` (holding `sl` of a tensor shaped `whole`) from `read(source box)`, one box at a time; the
    padding, if any, is zeroed. `box` as in `blocks`."""
    for src, dst in blocks(whole, sl, box):
        dest[dst].copy_(read(src))
    for d, n in (sl.pad if sl else {}).items():
        dest.narrow(d, dest.shape[d] - n, n).zero_()


def held_shape(whole: tuple[int, ...], sl: TensorSlice | None) -> tuple[int, ...]:
    """The shape of a tensor holding `sl` of a tensor shaped `whole`, padding included."""
    if sl is None:
        return tuple(whole)
    return tuple(len(sl.index.get(d, range(n))) + sl.pad.get(d, 0) for d, n in enumerate(whole))


class SlicedLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that the keys in `slices` are read only in the parts their local
    tensor holds: one read item per block (`blocks`) instead of the whole stored tensor.

    torch's file reader still fetches each stored item it reads from whole and narrows it, one item at a
    time; the saved layout decides that (an item is one expert's tensor, or one dense weight)."""

    def __init__(self, slices: dict[str, TensorSlice]) -> None:
        super().__init__()
        self.slices = slices
        self._views: dict[tuple[str, int], torch.Tensor] = {}

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        full = self.state_dict
        unsliced = {k: v for k, v in full.items() if k not in self.slices}
        plan = create_default_local_load_plan(unsliced, self.metadata, not self.allow_partial_load)
        items = list(plan.items)
        for key, sl in self.slices.items():
            md = self.metadata.state_dict_metadata[key]
            assert isinstance(md, TensorStorageMetadata)
            whole, dest = tuple(md.size), full[key]
            if held_shape(whole, sl) != tuple(dest.shape):
                raise ValueError(f"{key}: holds {tuple(dest.shape)}, not its slice of the stored {whole}")
            chunks = []
            for i, (src, dst) in enumerate(blocks(whole, sl)):
                self._views[(key, i)] = dest[dst]
                chunks.append(
                    ChunkStorageMetadata(
                        offsets=torch.Size(s.start for s in src),
                        sizes=torch.Size(s.stop - s.start for s in src),
                    )
                )
            items += create_read_items_for_chunk_list(key, md, chunks)
            for d, n in sl.pad.items():
                dest.narrow(d, dest.shape[d] - n, n).zero_()
        return LoadPlan(items, plan.storage_data, plan.planner_data)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        if index.fqn in self.slices:
            assert index.index is not None
            return self._views[(index.fqn, index.index)]
        return super().lookup_tensor(index)

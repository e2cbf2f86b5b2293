"""The part of a whole stored tensor that a rank's parameter holds, and reading only that part.

A model cut for tensor-parallel decode (parallel/tensor.py) keeps, of many parameters, a slice: along some
dims a subset of the whole tensor's indices, in runs of consecutive ones (a head block, the gate rows then
the up rows of an expert), and for the LM head some zero rows after them. Loaders cut the model first, on
the meta device, and then read just those runs: a safetensors slice, a view of a memory-mapped `model.pt`,
DCP read items narrowed to them (`SlicedLoadPlanner`), whose bytes alone `SlicedFileSystemReader` reads
from the files. So a rank never reads or materialises a whole tensor that it keeps only part of, and the
model is never gathered anywhere.
"""

from __future__ import annotations

import io
import itertools
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

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


def index_runs(src: torch.Tensor, dst: torch.Tensor) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the maximal runs where the index lists src and dst both step by one
    (each run is one copy between two tensors)."""
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
        per_dim.append(index_runs(src, dst))
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
    tensor holds: one read item per block (`blocks`) instead of the whole stored tensor. torch's own file
    reader would still load each item it touches whole and narrow it in memory; `SlicedFileSystemReader`
    reads the blocks' bytes alone."""

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


class _TensorPickle(pickle.Unpickler):
    """Reads a `torch.save`d tensor's pickle without building it: (storage key, offset, size, stride)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage[2], offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch":
            return name  # a storage type: the dtype comes from the checkpoint's metadata
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a saved tensor")

    def persistent_load(self, pid: Any) -> Any:
        return pid


class _ItemView(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable file of their own (what zipfile needs)."""

    def __init__(self, file: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self.file, self.start, self.length, self.pos = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def read(self, size: int | None = -1) -> bytes:
        n = self.length - self.pos if size is None or size < 0 else min(size, self.length - self.pos)
        self.file.seek(self.start + self.pos)
        out = self.file.read(n)
        self.pos += len(out)
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _stored_tensor(item: IO[bytes], numel: int, itemsize: int) -> int | None:
    """Where a contiguous tensor of `numel` elements starts inside one DCP item (a `torch.save` zip, stored
    uncompressed), or None when the item is anything else: the caller then reads it whole."""
    try:
        zf = zipfile.ZipFile(item)
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        key, offset, size, stride = _TensorPickle(zf.open(pkl)).load()
        info = zf.getinfo(f"{pkl[: -len('data.pkl')]}data/{key}")
    except (zipfile.BadZipFile, StopIteration, KeyError, pickle.UnpicklingError, TypeError, ValueError):
        return None
    contiguous = tuple(math.prod(size[d + 1 :]) for d in range(len(size)))
    if (
        info.compress_type != zipfile.ZIP_STORED
        or offset != 0
        or math.prod(size) != numel
        or info.file_size != numel * itemsize
        or (stride != contiguous and numel > 1)
    ):
        return None
    item.seek(info.header_offset)
    name_len, extra_len = struct.unpack("<2H", item.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _runs_of(size: tuple[int, ...], starts: list[int], lengths: list[int]) -> tuple[list[int], int]:
    """Element offsets of the contiguous runs that make up a box of a contiguous tensor, and their length."""
    k = len(size)  # the box is whole in every dim from k on: one run spans those dims
    while k > 0 and starts[k - 1] == 0 and lengths[k - 1] == size[k - 1]:
        k -= 1
    if k == 0:
        return [0], math.prod(size)
    inner = math.prod(size[k:])
    run = lengths[k - 1] * inner
    strides = [math.prod(size[d + 1 :]) for d in range(k)]
    offsets = [
        sum(i * st for i, st in zip(idx, strides[: k - 1], strict=True)) + starts[k - 1] * strides[k - 1]
        for idx in itertools.product(
            *(range(a, a + n) for a, n in zip(starts[: k - 1], lengths[: k - 1], strict=True))
        )
    ]
    return offsets, run


class SlicedFileSystemReader(FileSystemReader):
    """DCP's file reader, except that the read items of the keys a `SlicedLoadPlanner` narrows are read as
    byte ranges of the stored tensor (runs of whole rows, or a row's columns), not as the whole item:
    torch's reader loads every item it touches whole and narrows it in memory. Items it cannot place (a
    transform, a non-contiguous save) go through torch's reader. `bytes_read` counts what it read itself."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.bytes_read = 0

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        sliced = getattr(planner, "slices", {})
        metadata = getattr(planner, "metadata", None)
        mine: dict[str, list[ReadItem]] = {}  # by file: each is opened once, as torch's reader does
        rest = []
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            ours = req.type == LoadItemType.TENSOR and req.storage_index.fqn in sliced
            if ours and metadata is not None and not info.transform_descriptors:
                mine.setdefault(info.relative_path, []).append(req)
            else:
                rest.append(req)
        for path, reqs in mine.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, path), "rb") as stream:
                starts: dict[MetadataIndex, int | None] = {}  # an item's tensor start, found once per item
                rest += [req for req in reqs if not self._read_box(stream, req, planner, starts)]
        return super().read_data(LoadPlan(rest, plan.storage_data, plan.planner_data), planner)

    def _read_box(
        self, stream: IO[bytes], req: ReadItem, planner: LoadPlanner, starts: dict[MetadataIndex, int | None]
    ) -> bool:
        """Read one request's box from the open file; False when its item is not a plain stored tensor."""
        md = planner.metadata.state_dict_metadata[req.storage_index.fqn]
        assert isinstance(md, TensorStorageMetadata) and req.storage_index.index is not None
        dtype, size = md.properties.dtype, tuple(md.chunks[req.storage_index.index].sizes)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        info = self.storage_data[req.storage_index]
        if req.storage_index not in starts:
            view = _ItemView(stream, info.offset, info.length)
            starts[req.storage_index] = _stored_tensor(view, math.prod(size), itemsize)
        start = starts[req.storage_index]
        if start is None:
            return False
        offsets, run = _runs_of(size, list(req.storage_offsets), list(req.lengths))
        data = bytearray(len(offsets) * run * itemsize)
        for i, off in enumerate(offsets):
            stream.seek(info.offset + start + off * itemsize)
            data[i * run * itemsize : (i + 1) * run * itemsize] = stream.read(run * itemsize)
        self.bytes_read += len(data)
        block = torch.frombuffer(data, dtype=dtype).view(tuple(req.lengths))
        target = planner.resolve_tensor(req).detach()
        target.copy_(block)
        planner.commit_tensor(req, target)
        return True

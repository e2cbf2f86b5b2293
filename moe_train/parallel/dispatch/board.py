"""Boards: the direct dispatcher's transport, where a rank's peers read its rows in place.

The direct dispatcher (direct.py) knows, before any row moves, where each slot's row belongs in its owner's
buffer. Over a board it moves them without send blocks (the all-to-all twin's path) by two operations:

- `publish(x)`: every rank offers a tensor of the same shape; each gets every rank's, in rank order. An
  owner then gathers its buffer rows straight from the senders' published rows, and a sender sums a
  token's k expert rows straight from the owners' published outputs.
- `post(rows, places, vals)`: every rank writes small values at given rows of each peer's buffer (peer p
  gets `vals[p]` at `places[p]`); each gets its own buffer back once every peer has written. The senders
  tell an owner which token of which rank each of its buffer rows holds, and each row's gate.

`SymmBoard` runs them on torch's CUDA symmetric memory: `publish` copies x into this rank's symmetric buffer
between two barriers (every peer is done reading what this buffer held; every peer's copy has landed) and
hands out the peers' buffers mapped into this process with a device table of their addresses, so one
kernel (`ops.gather.gather_from`, `sum_bags_from`) loads rows straight from every peer's memory; `post`
writes into the peers' mapped buffers between two barriers. Nothing is read on the host, and the barrier
is a kernel, so a layer over it can be captured in a CUDA graph; it runs on a one-rank group too. Results
stay valid until the board's next use for the same shape: a caller consumes them at once (nothing that
autograd saves may point into them).

`GatherBoard` runs the same two operations with collectives (`all_gather`, and an equal-splits
`all_to_all` of the posted values; `parallel.dispatch_transport=collective`): the CPU twin the tests run on
gloo, so the placement maps, the gathers and the sums over peers are checked in several processes. Rows
nobody posted hold NaN there (on CUDA: whatever the buffer held), so a reader that used one would show it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ...ops.gather import Sources
from .symm import SymmGroup, byte_rows


class Board(ABC):
    """Publish and post between the ranks of a group (module docstring). `size` ranks, this one `rank`."""

    size: int
    rank: int

    @abstractmethod
    def publish(self, x: torch.Tensor, zero_rows: int = 0) -> Sources:
        """Every rank's `x` (the same shape on each) followed by `zero_rows` rows of zeros, in rank order;
        read them before this board's next use for that shape."""

    @abstractmethod
    def post(self, rows: int, places: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """This rank's buffer of `rows` rows once every peer p wrote its `vals[p]` (B, ...) at rows
        `places[p]` (B,) of it; rows nobody wrote hold anything. Several writes to one row (a dump row for
        padding) leave one of them."""


@dataclass
class GatherBoard(Board):
    """A board over collectives on the group's own backend (module docstring)."""

    group: Any
    device: torch.device | None = None

    def __post_init__(self) -> None:
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def publish(self, x: torch.Tensor, zero_rows: int = 0) -> Sources:
        x = x.detach()
        x = torch.cat([x, x.new_zeros(zero_rows, *x.shape[1:])]) if zero_rows else x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(out, x, group=self.group)
        return Sources(out)

    def post(self, rows: int, places: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        got_places, got_vals = torch.empty_like(places), torch.empty_like(vals)
        dist.all_to_all_single(got_places, places.contiguous(), group=self.group)
        dist.all_to_all_single(got_vals, vals.contiguous(), group=self.group)
        buf = vals.new_full((rows, *vals.shape[2:]), float("nan"))
        return buf.index_copy_(0, got_places.reshape(-1), got_vals.reshape(-1, *vals.shape[2:]))


@dataclass
class _Mapped:
    buf: torch.Tensor  # this rank's symmetric buffer (bytes)
    handle: Any  # its symmetric-memory handle: the barrier
    peers: list[torch.Tensor]  # every rank's buffer mapped here, in rank order (this rank's is `buf`)
    table: torch.Tensor  # their addresses on the device (int64), for the one-pass reads


@dataclass
class SymmBoard(SymmGroup, Board):
    """A board on CUDA symmetric memory (module docstring); one buffer per use and (rows, row bytes)."""

    buffers: dict[tuple[str, int, int], _Mapped] = field(default_factory=dict)
    BACKEND = "CUDA"

    def _get(self, use: str, rows: int, width: int) -> _Mapped:
        """The buffer for `rows` rows of `width` bytes; allocating it is collective (every rank makes the
        same calls in the same order)."""
        key = (use, rows, width)
        if key not in self.buffers:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(rows, width, dtype=torch.uint8, device=self.device)
            handle = symm_mem.rendezvous(buf, self.name)
            peers = [handle.get_buffer(p, (rows, width), torch.uint8) for p in range(self.size)]
            table = torch.tensor([t.data_ptr() for t in peers], dtype=torch.int64, device=self.device)
            self.buffers[key] = _Mapped(buf, handle, peers, table)
        return self.buffers[key]

    def publish(self, x: torch.Tensor, zero_rows: int = 0) -> Sources:
        flat = byte_rows(x.detach())
        n = flat.shape[0]
        b = self._get("publish", n + zero_rows, flat.shape[1])
        b.handle.barrier(channel=0)  # every peer has read what this buffer last held
        b.buf[:n].copy_(flat)
        b.buf[n:].zero_()
        b.handle.barrier(channel=0)  # every peer's rows have landed
        return Sources([p.view(x.dtype).view(n + zero_rows, *x.shape[1:]) for p in b.peers], b.table)

    def post(self, rows: int, places: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        block = vals.shape[1]
        flat = byte_rows(vals.detach().reshape(self.size * block, *vals.shape[2:]))
        b = self._get("post", rows, flat.shape[1])
        b.handle.barrier(channel=0)  # every rank has read what its buffer last held
        for p, dest in enumerate(b.peers):
            dest.index_copy_(0, places[p], flat[p * block : (p + 1) * block])
        b.handle.barrier(channel=0)  # every peer's writes have landed
        return b.buf.view(vals.dtype).view(rows, *vals.shape[2:])

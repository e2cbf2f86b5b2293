"""The bounded dispatchers' blocks through symmetric memory: no NCCL, split sizes never on the host.

A bounded dispatcher (bounded.py, and `hierarchical_bounded`'s intra-node stage) sends every peer a block of
the same size, so on CUDA its hops can move through symmetric memory instead of NCCL. Two transports
(`parallel.dispatch_transport`), both exchanging equal blocks with the layout of `comm.A2AHop`:

- `peer_write` (`PeerWriteTransport`): torch's CUDA symmetric memory. Each rank's receive buffer is mapped
  into every peer's address space, and each rank writes its block for peer p straight into rows
  `rank·B …` of p's buffer, between two barriers (every peer has copied out what it last received; every
  block has landed). Ordinary copy kernels and the barrier's signal kernel, nothing read on the host, all
  captured like any other kernel; it runs on a one-rank group too.
- `nvshmem` (`NvshmemTransport`): each rank copies its blocks into a symmetric input buffer and one NVSHMEM
  kernel (`torch.ops.symm_mem.all_to_all_vdev`) puts block p into peer p's symmetric output buffer, reading
  the split sizes from a device tensor. torch 2.11's NVSHMEM rendezvous refuses a one-rank group.

Either copies the result out of its buffer before the next hop reuses it (hops run on the current stream,
one after another), so a rank's layers share one set of buffers per shape, made once for the model's
dispatchers. The all-to-all with equal splits (`comm.A2AHop`) is the same transfer with the same layout:
the CPU twin the tests run, and the portable path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ...ops.fp8 import pack_rows
from ..comm import A2AHop, Exchange


class Done:
    """The work handle of a transfer already queued on the current stream."""

    def wait(self) -> None:
        return None


def transport_missing(name: str, device: torch.device) -> str | None:
    """Why transport `name` cannot run on `device`; None if it can (the collective one runs anywhere)."""
    if name == "collective":
        return None
    if device.type != "cuda":
        return f"symmetric memory needs CUDA, the mesh is on {device.type}"
    import torch.distributed._symmetric_memory as symm_mem

    if name == "nvshmem" and not symm_mem.is_nvshmem_available():
        return "this torch build or machine has no NVSHMEM"
    return None


def held_bytes(transport: str, shapes: set[tuple[int, int]]) -> int:
    """Bytes a transport keeps allocated for the whole run: its symmetric buffers for exchanges of `shapes`
    ((rows, row bytes) each; one buffer set per distinct shape, shared by every layer). The all-to-all
    keeps none."""
    make = TRANSPORTS[transport]
    return 0 if make is None else make.COPIES * sum(rows * width for rows, width in shapes)


def byte_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows as bytes (a view where x is contiguous)."""
    return x.contiguous().view(x.shape[0], -1).view(torch.uint8)


class BlockTransport(ABC):
    """Equal blocks between the ranks of a group: block p of a tensor's rows to peer p."""

    @abstractmethod
    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Block p of x's rows (x.shape[0] / peers each) to peer p; the received blocks, in peer order,
        queued on the current stream."""


@dataclass
class CollectiveTransport(BlockTransport):
    """The same equal blocks through `all_to_all_single` on the group's own backend (gloo on CPU): the
    symmetric-memory transports' twin, which runs a bounded dispatcher's hops through the transport path
    (`SymmHop`: the exchange queued at issue, FP8 rows packed) where no symmetric memory exists
    (`parallel.dispatch_transport=collective`). `exchanges` counts its calls."""

    group: Any
    device: torch.device | None = None
    exchanges: int = 0
    COPIES = 0  # no buffer outlives an exchange

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        self.exchanges += 1
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out


@dataclass
class _PeerBuffer:
    buf: torch.Tensor  # this rank's receive buffer (bytes)
    handle: Any  # its symmetric-memory handle: peers' views and the barrier
    dests: list[torch.Tensor]  # where this rank's block lands in each peer's buffer, in peer order


@dataclass
class SymmGroup:
    """Symmetric memory over `group` on `device`, on the backend `BACKEND` names: the base of the
    transports here and of the direct dispatcher's board (board.py)."""

    group: Any
    device: torch.device
    BACKEND = ""
    COPIES = 1  # symmetric buffers held per exchanged shape (the memory estimate's `held_bytes`)

    def __post_init__(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        # one backend per process, and the choice holds from its first symmetric allocation on: CUDA's own
        # (the device's default) and NVSHMEM's buffers are not interchangeable
        if symm_mem.get_backend(self.device) != self.BACKEND:
            symm_mem.set_backend(self.BACKEND)
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.name = self.group.group_name


@dataclass
class PeerWriteTransport(SymmGroup, BlockTransport):
    """Each rank writes its blocks straight into its peers' symmetric receive buffers (module docstring);
    one buffer per (rows, row bytes)."""

    buffers: dict[tuple[int, int], _PeerBuffer] = field(default_factory=dict)
    BACKEND = "CUDA"
    COPIES = 1  # the receive buffer

    def _get(self, rows: int, width: int) -> _PeerBuffer:
        """The buffer for `rows` rows of `width` bytes; allocating it is collective (every rank of the group
        makes the same hops in the same order)."""
        key = (rows, width)
        if key not in self.buffers:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(rows, width, dtype=torch.uint8, device=self.device)
            handle = symm_mem.rendezvous(buf, self.name)
            block = rows // self.size
            mine = slice(self.rank * block, (self.rank + 1) * block)
            dests = [handle.get_buffer(p, (rows, width), torch.uint8)[mine] for p in range(self.size)]
            self.buffers[key] = _PeerBuffer(buf, handle, dests)
        return self.buffers[key]

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        flat = byte_rows(x)
        b = self._get(*flat.shape)
        block = flat.shape[0] // self.size
        b.handle.barrier(channel=0)  # every peer has copied out what it last received in this buffer
        for p, dest in enumerate(b.dests):
            dest.copy_(flat[p * block : (p + 1) * block])
        b.handle.barrier(channel=0)  # every peer's block has landed here (the barrier orders the writes)
        return b.buf.clone().view(x.dtype).view(x.shape)


@dataclass
class _Buffers:
    inp: torch.Tensor
    out: torch.Tensor
    splits: torch.Tensor  # rows per peer (torch's newer schema) or [splits; out splits; out offsets]
    out_splits: torch.Tensor | None


@dataclass
class NvshmemTransport(SymmGroup, BlockTransport):
    """NVSHMEM's all-to-all-v over `group` (module docstring); one set of buffers per (rows, row bytes)."""

    buffers: dict[tuple[int, int], _Buffers] = field(default_factory=dict)
    BACKEND = "NVSHMEM"
    COPIES = 2  # an input and an output buffer

    def __post_init__(self) -> None:
        super().__post_init__()
        # torch 2.11 (the GPU image) takes the input splits and the output splits with offsets apart; earlier
        # releases took one (3, peers) tensor [in splits; out splits; out offsets]
        schema = torch.ops.symm_mem.all_to_all_vdev.default._schema
        self.packed_splits = len(schema.arguments) == 4

    def _get(self, rows: int, width: int) -> _Buffers:
        """The buffers for `rows` rows of `width` bf16 values; allocating them is collective (every rank of
        the group makes the same hops in the same order)."""
        key = (rows, width)
        if key not in self.buffers:
            import torch.distributed._symmetric_memory as symm_mem

            def sym(*shape: int, dtype: torch.dtype) -> torch.Tensor:
                t = symm_mem.empty(*shape, dtype=dtype, device=self.device)
                symm_mem.rendezvous(t, self.name)
                return t

            inp, out = sym(rows, width, dtype=torch.bfloat16), sym(rows, width, dtype=torch.bfloat16)
            block = rows // self.size
            if self.packed_splits:
                splits, out_splits = sym(3, self.size, dtype=torch.int64), None
                splits[0].fill_(block)
            else:
                splits, out_splits = sym(self.size, dtype=torch.int64), sym(2, self.size, dtype=torch.int64)
                splits.fill_(block)
            self.buffers[key] = _Buffers(inp, out, splits, out_splits)
        return self.buffers[key]

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Rows travel as their bytes, viewed as bf16 pairs (NVSHMEM's kernel moves floating-point
        elements)."""
        flat = byte_rows(x)
        if flat.shape[1] % 2:
            raise ValueError(f"symmetric-memory rows need an even byte count, got {flat.shape[1]}")
        b = self._get(flat.shape[0], flat.shape[1] // 2)
        b.inp.view(torch.uint8).copy_(flat)
        if self.packed_splits:
            torch.ops.symm_mem.all_to_all_vdev(b.inp, b.out, b.splits, self.name)
        else:
            torch.ops.symm_mem.all_to_all_vdev(b.inp, b.out, b.splits, b.out_splits, self.name)
        return b.out.view(torch.uint8).clone().view(x.dtype).view(x.shape)


# parallel.dispatch_transport -> how the fixed-size blocks move (None: the all-to-all with equal splits;
# collective: the same blocks through the transport path, the symmetric-memory transports' CPU twin)
TRANSPORTS: dict[str, type[SymmGroup] | type[CollectiveTransport] | None] = {
    "alltoall": None,
    "collective": CollectiveTransport,
    "peer_write": PeerWriteTransport,
    "nvshmem": NvshmemTransport,
}


@dataclass
class SymmHop(A2AHop):
    """An equal-splits hop through `transport` (same blocks and layout as `A2AHop`'s all-to-all)."""

    transport: BlockTransport | None = field(default=None, repr=False)

    def forward_exchange(self, k: int, x: torch.Tensor) -> Exchange:
        x = x.detach()
        if self.fp8_rows and k == 0:
            return Exchange(self._send(pack_rows(x)), Done(), x.dtype)
        return Exchange(self._send(x), Done())

    def backward_exchange(self, k: int, grad: torch.Tensor) -> Exchange:
        return Exchange(self._send(grad), Done())

    def _send(self, x: torch.Tensor) -> torch.Tensor:
        assert self.transport is not None
        return self.transport.exchange(x)

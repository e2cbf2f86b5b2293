"""The bounded dispatcher's blocks through symmetric memory: NVSHMEM's all-to-all-v, splits on the device.

The bounded dispatcher (bounded.py) sends every peer a block of the same size, so on CUDA its hops can move
through symmetric memory instead of NCCL: each rank copies its blocks into a symmetric input buffer and one
NVSHMEM kernel (`torch.ops.symm_mem.all_to_all_vdev`) puts block p into peer p's symmetric output buffer,
reading the split sizes from a device tensor. Nothing is read on the host, and the kernel is captured like
any other. The result is copied out of the output buffer before the next hop reuses it (hops run on the
current stream, one after another), so a rank's layers share one set of buffers per shape:
`SymmTransport`, made once for the model's dispatchers.

The all-to-all with equal splits (`comm.A2AHop`) is the same transfer with the same layout: the CPU twin
the tests run, and the fallback wherever NVSHMEM is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ...ops.fp8 import pack_rows
from ..comm import A2AHop, Exchange


class _Done:
    """The work handle of a transfer already queued on the current stream."""

    def wait(self) -> None:
        return None


def nvshmem_missing(device: torch.device) -> str | None:
    """Why symmetric-memory transfers cannot run on `device`; None when they can."""
    if device.type != "cuda":
        return f"symmetric memory needs CUDA, the mesh is on {device.type}"
    import torch.distributed._symmetric_memory as symm_mem

    if not symm_mem.is_nvshmem_available():
        return "this torch build or machine has no NVSHMEM"
    return None


@dataclass
class _Buffers:
    inp: torch.Tensor
    out: torch.Tensor
    splits: torch.Tensor  # rows per peer (torch's newer schema) or [splits; out splits; out offsets]
    out_splits: torch.Tensor | None


@dataclass
class SymmTransport:
    """Symmetric buffers over `group`, one set per (rows, row bytes), and the exchange of equal blocks."""

    group: Any
    device: torch.device
    buffers: dict[tuple[int, int], _Buffers] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        # the device's default backend is CUDA's own, whose buffers NVSHMEM's kernels cannot use; the choice
        # holds from the first symmetric allocation on
        if symm_mem.get_backend(self.device) != "NVSHMEM":
            symm_mem.set_backend("NVSHMEM")
        self.size = dist.get_world_size(self.group)
        self.name = self.group.group_name
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
        """Block p of x's rows (x.shape[0] / peers each) to peer p; the received blocks, in peer order. Rows
        travel as their bytes, viewed as bf16 pairs (NVSHMEM's kernel moves floating-point elements)."""
        flat = x.contiguous().view(x.shape[0], -1).view(torch.uint8)
        if flat.shape[1] % 2:
            raise ValueError(f"symmetric-memory rows need an even byte count, got {flat.shape[1]}")
        b = self._get(flat.shape[0], flat.shape[1] // 2)
        b.inp.view(torch.uint8).copy_(flat)
        if self.packed_splits:
            torch.ops.symm_mem.all_to_all_vdev(b.inp, b.out, b.splits, self.name)
        else:
            torch.ops.symm_mem.all_to_all_vdev(b.inp, b.out, b.splits, b.out_splits, self.name)
        return b.out.view(torch.uint8).clone().view(x.dtype).view(x.shape)


@dataclass
class SymmHop(A2AHop):
    """An equal-splits hop through `transport` (same blocks and layout as `A2AHop`'s all-to-all)."""

    transport: SymmTransport | None = field(default=None, repr=False)

    def forward_exchange(self, k: int, x: torch.Tensor) -> Exchange:
        x = x.detach()
        if self.fp8_rows and k == 0:
            return Exchange(self._send(pack_rows(x)), _Done(), x.dtype)
        return Exchange(self._send(x), _Done())

    def backward_exchange(self, grad: torch.Tensor) -> Exchange:
        return Exchange(self._send(grad), _Done())

    def _send(self, x: torch.Tensor) -> torch.Tensor:
        assert self.transport is not None
        return self.transport.exchange(x)

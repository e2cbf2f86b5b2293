"""Bytes moved by the expert exchanges, from their real split sizes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ...ops.fp8 import TILE, packed_row_bytes


def sends_fp8(fp8_rows: bool, kind: str, rows: torch.Tensor) -> bool:
    """Whether a hop of `kind` sends `rows` as FP8 tiles: dispatch hops of a dispatcher with `fp8_rows`, for
    rows whose width 128 divides (combine stays in the rows' dtype)."""
    return fp8_rows and kind == "dispatch" and rows.shape[-1] % TILE == 0


def row_bytes(rows: torch.Tensor, fp8: bool = False) -> int:
    """Bytes one of `rows` takes on the wire: as it is, or packed as FP8 tiles with their scales."""
    return packed_row_bytes(rows.shape[-1]) if fp8 else rows.shape[-1] * rows.element_size()


@dataclass
class CommCounters:
    """What the dispatchers of a rank report each step; the trainer reads and resets it.

    bytes: moved, from the split sizes. Keys: 'dispatch' / 'combine' (all rows, self included), '*_remote'
    (rows to another rank), '*_inter_node' / '*_intra_node' (rows to another rank on another / the same node).
    overflows: on the device, the layer calls whose fixed-size buffers could not hold their rows
    (bounded.py); None while no bounded dispatcher ran.
    """

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    overflows: torch.Tensor | None = None

    def note_overflow(self, flag: torch.Tensor) -> None:
        """Count a device flag without reading it."""
        self.overflows = flag.long() if self.overflows is None else self.overflows + flag

    def take_overflows(self) -> torch.Tensor | None:
        out, self.overflows = self.overflows, None
        return out

    def add(self, kind: str, splits: list[int], row_bytes: int, me: int, peer_nodes: list[int]) -> None:
        """splits[i] rows of row_bytes go to group peer i; peer_nodes[i] is that peer's node."""
        for peer, rows in enumerate(splits):
            b = rows * row_bytes
            self.bytes[kind] += b
            if peer == me or rows == 0:
                continue
            self.bytes[f"{kind}_remote"] += b
            where = "inter_node" if peer_nodes[peer] != peer_nodes[me] else "intra_node"
            self.bytes[f"{kind}_{where}"] += b

    def take(self) -> dict[str, int]:
        out = dict(self.bytes)
        self.bytes.clear()
        return out

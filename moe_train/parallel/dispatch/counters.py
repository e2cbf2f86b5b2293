"""Bytes moved by the expert exchanges, from their real split sizes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CommCounters:
    """Bytes moved by dispatchers, from the real split sizes; the trainer reads and resets them each step.

    Keys: 'dispatch' / 'combine' (all rows, self included), '*_remote' (rows to another rank),
    '*_inter_node' / '*_intra_node' (rows to another rank on another / the same node).
    """

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

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

"""Counting what would make the host wait for a CUDA device, on any device (tests run on CPU).

A scalar read (`item`, `float`, `bool`, `if t:` — aten's `_local_scalar_dense`), an op whose output size
depends on tensor values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `bincount`,
`repeat_interleave` by a tensor), and the Python-side copies (`tolist`, `cpu`, `numpy`, `item`). On CUDA
each is a stream synchronisation; a step or a layer free of them can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SIZED_BY_VALUES = ("nonzero", "masked_select", "unique", "bincount", "repeat_interleave")


class HostReads(TorchDispatchMode):
    """Inside, `reads` lists each aten op that reads tensor values on the host (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default or name.startswith(_SIZED_BY_VALUES):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_copies() -> Iterator[list[str]]:
    """Inside, the yielded list names each Tensor.tolist / cpu / numpy / item call."""
    seen: list[str] = []
    originals = {n: getattr(torch.Tensor, n) for n in ("tolist", "cpu", "numpy", "item")}

    def spy(name: str):  # noqa: ANN202
        return lambda x, *a, **k: (seen.append(name), originals[name](x, *a, **k))[1]

    for name in originals:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)

"""The grouped FP8 Triton kernels (ops/fp8_grouped_triton.py) as plain torch that reads nothing on the host,
and a fixture that routes the FP8 experts through them on the CPU as on an FP8 GPU.

So whole training steps take the path a GPU takes — groups laid out on the device, tail rows kept, no count
read back — at the speed of eager torch (the interpreter runs the kernels themselves in test_fp8.py). The
twin asserts the operand layouts the tensor cores need: each FP8 operand contiguous along its reduction.
"""

from __future__ import annotations

import pytest
import torch

from moe_train.ops import fp8_grouped_triton as fgt
from moe_train.ops.fp8 import TILE

E4M3 = torch.float8_e4m3fn


def m_grouped_mm(a, sa, b, sb, tile_expert, out_dtype):  # noqa: ANN001, ANN201 - fgt.m_grouped_mm's contract
    m, k = a.shape
    t, n = m // TILE, b.shape[1]
    assert a.dtype == b.dtype == E4M3 and b.stride(-1) == 1 and tile_expert.shape == (t,)
    e = tile_expert.clamp(min=0).long()
    at, st = a.float().view(t, TILE, k // TILE, TILE), sa.reshape(t, TILE, k // TILE)
    bt, sbt = b.float()[e], sb[e]  # each tile's expert's weight and block scales
    out = torch.zeros(t, TILE, n)
    for j in range(k // TILE):  # per 128-wide slice of K: the product, scaled, into fp32
        part = at[:, :, j] @ bt[:, :, j * TILE : (j + 1) * TILE].transpose(1, 2)
        col = sbt[:, :, j].unsqueeze(-1).expand(t, n // TILE, TILE).reshape(t, n)
        out += part * st[:, :, j, None] * col[:, None, :]
    # a tile of no expert is never computed (its rows may hold anything, NaN included): zeros
    return torch.where((tile_expert >= 0)[:, None, None], out, 0.0).reshape(m, n).to(out_dtype)


def k_grouped_mm(a, sa, b, sb, starts, ends, out_dtype):  # noqa: ANN001, ANN201 - fgt.k_grouped_mm's contract
    n, m = a.shape
    kk, t = b.shape[0], m // TILE
    assert a.dtype == b.dtype == E4M3 and a.stride(1) == 1 and b.stride(1) == 1
    at, bt = a.float().view(n, t, TILE), b.float().view(kk, t, TILE)
    parts = torch.einsum("nti,kti->tnk", at, bt) * sa.t()[:, :, None] * sb.t()[:, None, :]  # each tile's
    row0 = torch.arange(t) * TILE
    owns = (row0[None, :] >= starts[:, None]) & (row0[None, :] < ends[:, None])  # [E, tiles]
    parts = torch.where(owns.any(0)[:, None, None], parts, 0.0)  # a tile outside every group is never read
    return torch.einsum("et,tnk->enk", owns.float(), parts).to(out_dtype)


@pytest.fixture
def grouped_fp8_twin(monkeypatch):
    """The FP8 experts run through the twin, as `fp8_experts_on_device` finds the kernels on the CPU."""
    monkeypatch.setattr(fgt, "runs_on", lambda device: True)
    monkeypatch.setattr(fgt, "m_grouped_mm", m_grouped_mm)
    monkeypatch.setattr(fgt, "k_grouped_mm", k_grouped_mm)

"""ops/fused.py: off CUDA every op is its plain form, bit for bit, values and gradients (the GPU forms are
held to the plain ones' error by bench/fused_ops.py)."""

from __future__ import annotations

import pytest
import torch

from moe_train.model.rope import RotaryTable
from moe_train.ops.fused import (
    rms_norm,
    rms_norm_plain,
    rotate_pairs,
    rotate_pairs_plain,
    swiglu_act,
    swiglu_plain,
)


def _leaves(dtype, *shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _same(fused, plain, inputs, extra=()):
    a, b = fused(*inputs, *extra), plain(*inputs, *extra)
    ga = torch.autograd.grad(a.float().square().sum(), inputs)
    gb = torch.autograd.grad(b.float().square().sum(), inputs)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_forms_are_the_plain_ops(dtype):
    _same(rms_norm, rms_norm_plain, _leaves(dtype, (6, 16), (16,)), (1e-6,))
    _same(swiglu_act, swiglu_plain, _leaves(dtype, (6, 16), (6, 16)))
    table = RotaryTable(8, 32, 10000.0, None)
    _same(rotate_pairs, rotate_pairs_plain, _leaves(dtype, (2, 3, 5, 8)), (table.cos[:5], table.sin[:5]))


def _pair_norms(t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (t.shape[-1] // 2, 2)).norm(dim=-1)


def test_rotary_table_rotates_interleaved_pairs():
    """Pair (2i, 2i+1) at position t turns by t·θ_i: a norm-preserving rotation of each pair."""
    table = RotaryTable(8, 16, 10000.0, None)
    x = torch.randn(1, 1, 16, 8)
    y = table(x)
    torch.testing.assert_close(_pair_norms(y), _pair_norms(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0: no turn

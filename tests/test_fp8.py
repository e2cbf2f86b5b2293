"""ops/fp8.py, the FP8 recipe's reference math: E4M3 rounding equal to torch's float8 conversion bit for bit,
tile and block scales, and the blockwise GEMM with fp32 promotion every 128 elements of K."""

from __future__ import annotations

import pytest
import torch

from moe_train.model.moe import MoE
from moe_train.ops.fp8 import (
    E4M3_MAX,
    TILE,
    blockwise_mm,
    dequantize_blocks,
    dequantize_tiles,
    fp8_eligible,
    fp8_linear,
    quantize_blocks,
    quantize_tiles,
    round_e4m3,
)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).view(torch.uint8)


def test_e4m3_rounding_equals_torchs_conversion_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    # a million values over every binade E4M3 has and beyond: subnormals (below 2^-6), exact ties,
    # values that saturate (above 448), signed zeros
    mags = torch.exp2(torch.empty(10**6).uniform_(-14, 11, generator=g))
    x = mags * torch.where(torch.rand(10**6, generator=g) < 0.5, -1.0, 1.0)
    ties = torch.arange(-2 * 448 * 8, 2 * 448 * 8 + 1) / 16.0  # midpoints between neighbours near 1..448
    sub = torch.arange(-64, 65) * 2.0**-11  # the subnormal grid and its half steps
    x = torch.cat([x, ties, sub, torch.tensor([0.0, -0.0, 447.9, 448.0, 464.0, 1e30, -1e30])])
    ref = round_e4m3(x)
    assert torch.equal(_bits(ref), _bits(x))  # same E4M3 encoding for every value
    assert torch.equal(ref, x.to(torch.float8_e4m3fn).float())
    assert ref.abs().max() == E4M3_MAX and torch.signbit(round_e4m3(torch.tensor(-0.0)))


def test_round_e4m3_keeps_nan():
    assert torch.isnan(round_e4m3(torch.tensor([float("nan")]))).all()


def test_tile_and_block_scales_bound_the_error_per_tile():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3 * TILE, generator=g)
    qx, sx = quantize_tiles(x)
    assert sx.shape == (4, 3) and qx.abs().max() == E4M3_MAX  # each tile's largest value maps onto 448
    err = (dequantize_tiles(qx, sx) - x).abs().reshape(4, 3, TILE).amax(-1)
    assert torch.all(err <= sx * E4M3_MAX * 2.0**-4)  # half an E4M3 step at the top binade
    spiked = x.clone()
    spiked[0, 5] = 1e5  # an outlier pushes its own tile's other values into subnormals, and only that tile
    qs, ss = quantize_tiles(spiked)
    assert torch.equal(qs.reshape(4, 3, TILE)[:, 1:], qx.reshape(4, 3, TILE)[:, 1:])
    assert torch.equal(qs[1:], qx[1:]) and not torch.equal(qs[0, :TILE], qx[0, :TILE])
    w = torch.randn(2 * TILE, 3 * TILE, generator=g)
    qw, sw = quantize_blocks(w)
    assert sw.shape == (2, 3)
    rel = (dequantize_blocks(qw, sw) - w).abs().max() / w.abs().max()
    assert rel <= 2.0**-4
    zero_x, zero_s = quantize_tiles(torch.zeros(2, TILE))
    assert torch.equal(zero_x, torch.zeros(2, TILE)) and torch.equal(zero_s, torch.ones(2, 1))


def test_blockwise_mm_is_the_product_of_the_dequantised_operands():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 2 * TILE, generator=g), torch.randn(TILE, 2 * TILE, generator=g)
    (qx, sx), (qw, sw) = quantize_tiles(x), quantize_blocks(w)
    y = blockwise_mm(qx, sx, qw, sw)
    want = dequantize_tiles(qx, sx).double() @ dequantize_blocks(qw, sw).double().t()
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-5)
    rel = (y - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < 0.05  # FP8's few mantissa bits: percent-level error against the fp32 product


def test_shapes_without_a_128_tiling_are_refused():
    with pytest.raises(ValueError, match="K=100 is not a multiple of 128"):
        quantize_tiles(torch.zeros(2, 100))
    with pytest.raises(ValueError, match=r"\[128, 100\]"):
        quantize_blocks(torch.zeros(128, 100))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_fp8_linear_runs_all_three_gemms_in_fp8():
    """Forward, Dgrad and Wgrad each carry FP8's error against the fp32 product (a few percent: 3 mantissa
    bits), not bf16's (a GEMM left in fp32 or bf16 would show 0 or ~0.3%)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 2 * TILE, generator=g).requires_grad_()  # 300 tokens: padded for Wgrad's tiles
    w = (torch.randn(3 * TILE, 2 * TILE, generator=g) / 16).requires_grad_()
    y = fp8_linear(x, w)
    go = torch.randn(y.shape, generator=g)
    dx, dw = torch.autograd.grad(y, (x, w), go)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    yr = xr @ wr.t()
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), go)
    for got, want in ((y, yr), (dx, dxr), (dw, dwr)):
        assert 0.01 < _rel(got, want) < 0.06
    # forward rows are independent: the padded rows change nothing
    torch.testing.assert_close(fp8_linear(x[:7], w), y[:7], rtol=0, atol=0)
    assert blockwise_mm(*quantize_tiles(x.detach()), *quantize_blocks(w.detach())).equal(y.detach())


def test_eligibility_needs_both_dims_tiled_by_128():
    assert fp8_eligible(256, 384) and not fp8_eligible(256, 100) and not fp8_eligible(64, 128)


@pytest.mark.slow  # 120 emulated-FP8 and fp32 steps on the CPU
def test_fp8_trains_within_2_percent_of_fp32(tmp_path):
    """The recipe's acceptance on CPU: with FP8 emulated, a tiny model's loss after 60 steps is within 2% of
    the fp32 run's; parameter names and the bf16 master path are those of bf16_master."""
    from moe_train.train.trainer import Trainer
    from tiny_cfg import tiny_cfg

    losses = {}
    for dtype in ("fp32", "fp8"):
        run = tmp_path / dtype
        t = Trainer(tiny_cfg(str(run), "trainer.resume=none", f"trainer.dtype={dtype}", steps=60), str(run))
        records = [t.train_step(s) for s in range(60)]
        losses[dtype] = sum(r["loss"] for r in records[-5:]) / 5
        if dtype == "fp8":
            assert 0 < records[-1]["fp8_gemm_share"] < 1  # the counter each train record carries
            fp8 = [m for m in t.model.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]
            assert fp8 and all(p.dtype == torch.bfloat16 for m in fp8 for p in m.parameters())
    assert losses["fp8"] == pytest.approx(losses["fp32"], rel=0.02)


def test_conversion_runs_the_eligible_linears_in_fp8_and_counts_the_rest():
    """Eligible linears (both dims multiples of 128) and routed experts switch to FP8, the rest and the head
    stay; the share counts the ineligible ones' work as not in FP8."""
    from moe_train.config import ModelConfig
    from moe_train.model import build_model
    from moe_train.model.fp8 import convert_to_fp8

    cfg = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=256, moe_intermediate_size=128)
    model = build_model(cfg, seed=0)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    x = torch.randn(2, 64, 128)
    plain = {n: m(x) for n, m in linears.items() if m.in_features == 128}
    cov = convert_to_fp8(model, cfg)
    converted = {n for n, m in linears.items() if "forward" in vars(m)}
    assert "lm_head" not in converted
    assert converted == {
        n for n, m in linears.items() if n != "lm_head" and fp8_eligible(m.in_features, m.out_features)
    }
    for n in converted & plain.keys():
        assert 0.005 < _rel(linears[n](x), plain[n]) < 0.06, n
    assert 0 < cov.fp8 < cov.eligible and 0 < cov.share < 1
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    assert moe.experts.linear is fp8_linear
    flat = x.reshape(-1, 128)[:96]
    counts = torch.tensor([40, 0, 56] + [0] * (moe.experts.num_local - 3))
    got = moe.experts(flat, counts)
    moe.experts.linear = None
    assert 0.005 < _rel(got, moe.experts(flat, counts)) < 0.1  # two FP8 products in a row
    small = ModelConfig(vocab_size=97, moe_intermediate_size=64)  # experts of 64 do not tile by 128
    small_model = build_model(small, seed=0)
    convert_to_fp8(small_model, small)
    assert all(m.experts.linear is None for m in small_model.modules() if isinstance(m, MoE))

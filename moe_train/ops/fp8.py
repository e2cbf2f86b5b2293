"""The FP8 recipe's quantisation math in plain PyTorch (DeepSeek-V3 §3.3): the reference the FP8 kernels are
held to, and the CPU path of FP8 training.

- E4M3 (`float8_e4m3fn`): 4 exponent bits (bias 7), 3 mantissa bits, no infinities, largest finite 448,
  subnormals down to 2⁻⁹. `round_e4m3` rounds to nearest, ties to even, saturating at ±448 — written with
  frexp and round rather than by casting, so that it states the format and can be checked against torch's own
  conversion.
- Scales are computed online from the data: activations get one per 1×128 tile along the GEMM's reduction
  dimension K (`quantize_tiles`), weights one per 128×128 block (`quantize_blocks`). A scale maps the tile's
  largest magnitude onto 448, so an outlier costs precision only in its own tile.
- `blockwise_mm` multiplies the two: each 128-wide slice of K is a partial product of FP8 values, scaled by
  its tile and block scales and then accumulated in fp32 — the recipe's promotion of partial sums to fp32
  every 128 elements of K.

A GEMM whose K or N is not a multiple of 128 has no such tiling; callers keep it in bf16.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
TILE = 128
_MANTISSA_BITS = 3
_MIN_NORMAL_EXP = -6  # 2^-6, E4M3's smallest normal


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (any float dtype) rounded to the nearest E4M3 value, ties to even, saturated to ±448; fp32 out.
    NaN stays NaN; the sign of zero is kept."""
    xf = x.float()
    a = xf.abs().clamp(max=E4M3_MAX)
    _, exp = torch.frexp(a)  # a = m·2^exp with m in [0.5, 1): a's binade starts at 2^(exp-1)
    binade = torch.clamp(exp - 1, min=_MIN_NORMAL_EXP)  # below 2^-6 the spacing stays that of subnormals
    step = torch.ldexp(torch.ones_like(a), binade - _MANTISSA_BITS)
    q = torch.round(a / step) * step  # torch.round: half to even
    return torch.copysign(torch.minimum(q, torch.tensor(E4M3_MAX)), xf)


def _scales(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scales mapping amax onto 448; an all-zero tile gets 1 (its values stay 0)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [..., K] → (E4M3 values as fp32 [..., K], scales [..., K/128]): one scale per 1×128 tile
    along K. value · scale (per tile) approximates x."""
    *lead, k = x.shape
    if k % TILE:
        raise ValueError(f"quantize_tiles: K={k} is not a multiple of {TILE}")
    tiles = x.float().reshape(*lead, k // TILE, TILE)
    scale = _scales(tiles.abs().amax(-1))
    return round_e4m3(tiles / scale[..., None]).reshape(*lead, k), scale


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [N, K] → (E4M3 values as fp32 [N, K], scales [N/128, K/128]): one scale per 128×128 block."""
    n, k = w.shape
    if n % TILE or k % TILE:
        raise ValueError(f"quantize_blocks: [{n}, {k}] is not a multiple of {TILE} in both dims")
    blocks = w.float().reshape(n // TILE, TILE, k // TILE, TILE)
    scale = _scales(blocks.abs().amax(dim=(1, 3)))
    return round_e4m3(blocks / scale[:, None, :, None]).reshape(n, k), scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    *lead, k = q.shape
    return (q.reshape(*lead, k // TILE, TILE) * scale[..., None]).reshape(*lead, k)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.reshape(n // TILE, TILE, k // TILE, TILE) * scale[:, None, :, None]).reshape(n, k)


def blockwise_mm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x @ w.T from tile-quantised x ([M, K], scales [M, K/128]) and w ([N, K]) quantised by blocks (scales
    [N/128, K/128]) or by tiles (scales [N, K/128], as Wgrad's operands are): per 128-wide slice of K, the FP8
    partial product in fp32, times the two operands' scales, accumulated in fp32. [M, N] fp32."""
    m, k = qx.shape
    n = qw.shape[0]
    if sw.shape[0] != n:  # one scale per 128 rows: spread it over its rows
        sw = sw.repeat_interleave(TILE, dim=0)
    out = torch.zeros(m, n, dtype=torch.float32, device=qx.device)
    for j in range(k // TILE):
        part = qx[:, j * TILE : (j + 1) * TILE] @ qw[:, j * TILE : (j + 1) * TILE].t()
        out += part * sx[:, j, None] * sw[None, :, j]
    return out


def fp8_eligible(in_features: int, out_features: int) -> bool:
    """A linear layer the recipe runs in FP8: both its dims tile by 128 (forward's K and N, Dgrad's too)."""
    return in_features % TILE == 0 and out_features % TILE == 0


class _FP8Linear(torch.autograd.Function):
    """y = x @ w.T with Fprop, Dgrad and Wgrad each an FP8 GEMM of online-quantised operands: activations and
    output gradients by 1×128 tiles along each GEMM's K, the weight by 128×128 blocks (transposed for Dgrad:
    the same blocks). Wgrad reduces over tokens, so both of its operands are tiled along the tokens."""

    @staticmethod
    def forward(ctx, x, w):  # noqa: ANN001, ANN205 - autograd's signature; x [M, K], w [N, K]
        qw, sw = quantize_blocks(w)
        ctx.save_for_backward(x, qw, sw)
        ctx.dtypes = x.dtype, w.dtype
        return blockwise_mm(*quantize_tiles(x), qw, sw).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, qw, sw = ctx.saved_tensors
        dx = blockwise_mm(*quantize_tiles(dy), qw.t(), sw.t())  # Dgrad: K of this GEMM is N
        dw = blockwise_mm(*quantize_tiles(dy.t()), *quantize_tiles(x.t()))  # Wgrad: K is the tokens
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1])


def fp8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T, all three GEMMs in emulated FP8 (`_FP8Linear`); the tokens (x's leading dims) are
    padded to a multiple of 128 for Wgrad's tiles and the padding dropped."""
    lead, k = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, k)
    pad = -flat.shape[0] % TILE
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, k)])
    y = _FP8Linear.apply(flat, w)
    return y[: y.shape[0] - pad].reshape(*lead, w.shape[0])

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

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fused import compiled_on_cuda, swiglu_act, swiglu_plain

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


def _tile_scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] over its 1×128 tiles' scales (each tile's largest magnitude at 448), and the scales."""
    *lead, k = x.shape
    if k % TILE:
        raise ValueError(f"quantize_tiles: K={k} is not a multiple of {TILE}")
    tiles = x.float().reshape(*lead, k // TILE, TILE)
    scale = _scales(tiles.abs().amax(-1))
    return (tiles / scale[..., None]).reshape(*lead, k), scale


def _block_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] divided by its 128×128 blocks' scales, and the scales [N/128, K/128]."""
    n, k = w.shape
    if n % TILE or k % TILE:
        raise ValueError(f"quantize_blocks: [{n}, {k}] is not a multiple of {TILE} in both dims")
    blocks = w.float().reshape(n // TILE, TILE, k // TILE, TILE)
    scale = _scales(blocks.abs().amax(dim=(1, 3)))
    return (blocks / scale[:, None, :, None]).reshape(n, k), scale


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [..., K] → (E4M3 values as fp32 [..., K], scales [..., K/128]): one scale per 1×128 tile
    along K. value · scale (per tile) approximates x."""
    v, scale = _tile_scaled(x)
    return round_e4m3(v), scale


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [N, K] → (E4M3 values as fp32 [N, K], scales [N/128, K/128]): one scale per 128×128 block."""
    v, scale = _block_scaled(w)
    return round_e4m3(v), scale


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


# The kernel path. Operands are real float8_e4m3fn tensors with fp32 scales, made by a kernel set
# (`FP8Kernels`): torchao's Triton casts where torchao is installed on an SM90 GPU, else the reference's
# casts. The GEMM is `torch._scaled_mm` with block-wise scales on SM90 (cuBLAS: 1×128 × 128×128 for Fprop and
# Dgrad, 1×128 × 1×128 for Wgrad) and `blockwise_mm`, the reference, elsewhere; bench/fp8_gemm.py checks the
# kernel against the reference on the GPU.


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Scaled values as float8_e4m3fn: torch's conversion, which is `round_e4m3` (tests/test_fp8.py)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _cast_tiles_plain(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v, scale = _tile_scaled(x)
    return _to_e4m3(v), scale


def _cast_blocks_plain(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v, scale = _block_scaled(w)
    return _to_e4m3(v), scale


def _pack_rows_plain(x: torch.Tensor) -> torch.Tensor:
    q, s = _cast_tiles_plain(x)
    return torch.cat([q.view(torch.uint8), s.view(torch.uint8)], dim=-1)


# The casts are memory-bound: one fused pass each on CUDA (compiled), the plain form elsewhere.
cast_tiles = compiled_on_cuda(_cast_tiles_plain, training_only=False)
cast_blocks = compiled_on_cuda(_cast_blocks_plain, training_only=False)
pack_rows = compiled_on_cuda(_pack_rows_plain, training_only=False)


def packed_row_bytes(k: int) -> int:
    """Bytes of one row of width k as `pack_rows` sends it: k E4M3 values and k/128 fp32 scales."""
    return k + 4 * (k // TILE)


class _RoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return unpack_rows(pack_rows(x.reshape(-1, x.shape[-1])), x.dtype).view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x as FP8 dispatch delivers it: its 1×128 tiles quantised and dequantised (idempotent: rows that came
    through an FP8 exchange come back the same); the gradient passes straight through."""
    return _RoundTrip.apply(x)


def unpack_rows(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows `pack_rows` packed, dequantised to `dtype`: `dequantize_tiles(*quantize_tiles(x))`."""
    k = packed.shape[-1] * TILE // (TILE + 4)
    q = packed[:, :k].contiguous().view(torch.float8_e4m3fn)
    s = packed[:, k:].contiguous().view(torch.float32)
    return dequantize_tiles(q.float(), s).to(dtype)


def scaled_mm_available(x: torch.Tensor) -> bool:
    """Whether `fp8_mm` runs torch's block-scaled kernel here: CUDA on SM90 (cuBLAS's block-wise scaling)."""
    return x.is_cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(x.device)[0] == 9


def _outer_major(s: torch.Tensor) -> torch.Tensor:
    """Scales laid out with their first dim fastest, as cuBLAS reads an operand's tile scales."""
    return s.t().contiguous().t()


def fp8_mm(
    qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """a @ b.T for FP8 a [M, K] with 1×128 tile scales [M, K/128] and FP8 b [N, K] with 128×128 block scales
    [N/128, K/128] or 1×128 tile scales [N, K/128]; fp32 accumulation with promotion every 128 of K."""
    if not scaled_mm_available(qa):
        return blockwise_mm(qa.float(), sa, qb.float(), sb).to(out_dtype)
    # cuBLAS takes a row-major and b column-major; a's tile scales outer-dim-major (M fastest); b's scales
    # indexed like b ([K/128, N] or [K/128, N/128]): tiles with N fastest, blocks with K/128 fastest
    scale_a = _outer_major(sa)
    scale_b = sb.t().contiguous() if sb.shape[0] == qb.shape[0] else sb.contiguous().t()
    return torch._scaled_mm(qa.contiguous(), qb.contiguous().t(), scale_a, scale_b, out_dtype=out_dtype)


@dataclass(frozen=True)
class FP8Kernels:
    """The casts and the GEMM of an FP8 linear as one implementation provides them. Each cast returns an
    operand (E4M3 values, fp32 scales) laid out for this set's own `mm(a, b, out_dtype)` = a @ b."""

    name: str
    act: Callable  # x [M, K] -> a: 1×128 tiles along K (Fprop's x, Dgrad's dy)
    act_tokens: Callable  # x [M, K] -> b of Wgrad: x tiled by 128 along the tokens M
    act_tokens_t: Callable  # dy [M, N] -> a of Wgrad: dy.T, tiled by 128 along the tokens M
    weight: Callable  # w [N, K] -> b of Fprop: w.T in 128×128 blocks
    weight_t: Callable  # w [N, K] -> b of Dgrad: w in 128×128 blocks
    mm: Callable
    # the operands of rows [r0, r1) (r0, r1 multiples of 128): of an `act` one, of an `act_tokens_t` one (a
    # of Wgrad) and of an `act_tokens` one (b of Wgrad); what a grouped linear hands each group's GEMM
    rows: Callable
    tokens_a: Callable
    tokens_b: Callable


def _blocks_t(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = cast_blocks(w)
    return q.t().contiguous(), s.t()


def _token_columns(t: tuple[torch.Tensor, torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
    return t[0][:, r0:r1], t[1][:, r0 // TILE : r1 // TILE]


# The reference's casts (compiled on CUDA) with `fp8_mm`: b operands are held row-major along their K.
REFERENCE = FP8Kernels(
    "reference",
    act=cast_tiles,
    act_tokens=lambda x: cast_tiles(x.t()),
    act_tokens_t=lambda dy: cast_tiles(dy.t()),
    weight=cast_blocks,
    weight_t=_blocks_t,
    mm=lambda a, b, dtype: fp8_mm(*a, *b, dtype),
    rows=lambda a, r0, r1: (a[0][r0:r1], a[1][r0:r1]),
    tokens_a=_token_columns,  # both Wgrad operands are [*, tokens] here
    tokens_b=_token_columns,
)


@functools.cache
def _torchao_kernels() -> FP8Kernels | None:
    """torchao's Triton casts for the block-wise recipe (`torchao.prototype.blockwise_fp8_training`) with
    `torch._scaled_mm`, where torchao is installed; they write every operand in the layout cuBLAS reads."""
    try:
        from torchao.prototype.blockwise_fp8_training import kernels as k
    except Exception:  # noqa: BLE001 - absent or built for another torch: the reference casts serve
        return None

    def contiguous(cast: Callable) -> Callable:
        return lambda x: cast(x.contiguous(), TILE)

    return FP8Kernels(
        "torchao",
        act=contiguous(k.triton_fp8_blockwise_act_quant_lhs),
        act_tokens=contiguous(k.triton_fp8_blockwise_act_quant_rhs),
        act_tokens_t=contiguous(k.triton_fp8_blockwise_act_quant_transposed_lhs),
        weight=contiguous(k.triton_fp8_blockwise_weight_quant_transposed_rhs),
        weight_t=contiguous(k.triton_fp8_blockwise_weight_quant_rhs),
        mm=lambda a, b, dtype: torch._scaled_mm(a[0], b[0], a[1], b[1], out_dtype=dtype),
        rows=lambda a, r0, r1: (a[0][r0:r1], _outer_major(a[1][r0:r1])),
        tokens_a=lambda t, r0, r1: (
            t[0][:, r0:r1].contiguous(),
            _outer_major(t[1][:, r0 // TILE : r1 // TILE]),
        ),
        tokens_b=lambda t, r0, r1: (_outer_major(t[0][r0:r1]), t[1][r0 // TILE : r1 // TILE]),
    )


def fp8_kernels(x: torch.Tensor) -> FP8Kernels:
    """The kernel set for tensors like x: torchao's casts with `_scaled_mm` on SM90 where torchao is
    installed, else the reference casts (their GEMM is `_scaled_mm` on SM90, `blockwise_mm` elsewhere)."""
    return (_torchao_kernels() if scaled_mm_available(x) else None) or REFERENCE


class _FP8Linear(torch.autograd.Function):
    """y = x @ w.T with Fprop, Dgrad and Wgrad each an FP8 GEMM of online-quantised operands: activations and
    output gradients by 1×128 tiles along each GEMM's K, the weight by 128×128 blocks (transposed for Dgrad:
    the same blocks). Wgrad reduces over tokens, so both of its operands are tiled along the tokens.

    The input is kept for backward only as its FP8 Wgrad operand (the recipe caches linear inputs in FP8),
    cast in forward; the weight is the parameter itself, cast again in backward."""

    @staticmethod
    def forward(ctx, x, w):  # noqa: ANN001, ANN205 - autograd's signature; x [M, K], w [N, K]
        k = ctx.kernels = fp8_kernels(x)
        ctx.save_for_backward(*k.act_tokens(x), w)
        ctx.x_dtype = x.dtype
        return k.mm(k.act(x), k.weight(w), x.dtype)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        qx, sx, w = ctx.saved_tensors
        k = ctx.kernels
        dy = dy.contiguous()
        dx = k.mm(k.act(dy), k.weight_t(w), ctx.x_dtype)  # Dgrad: K of this GEMM is N
        dw = k.mm(k.act_tokens_t(dy), (qx, sx), w.dtype)  # Wgrad: K is the tokens
        return dx, dw


def fp8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T, all three GEMMs in FP8 (`_FP8Linear`); the tokens (x's leading dims) are padded to a
    multiple of 128 for Wgrad's tiles and the padding dropped."""
    lead, k = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, k)
    pad = -flat.shape[0] % TILE
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, k)])
    y = _FP8Linear.apply(flat, w)
    return y[: y.shape[0] - pad].reshape(*lead, w.shape[0])


class _SwiGLUFromFP8(torch.autograd.Function):
    """`swiglu_plain(gate, up, gates)` whose backward recomputes it from gate and up held as FP8 tiles: the
    recipe caches the routed experts' SwiGLU input in FP8 and recomputes the output in backward."""

    @staticmethod
    def forward(ctx, gate, up, gates):  # noqa: ANN001, ANN205
        ctx.save_for_backward(*cast_tiles(gate), *cast_tiles(up), gates)
        ctx.dtype = gate.dtype
        return swiglu_act(gate, up, gates)

    @staticmethod
    def backward(ctx, dh):  # noqa: ANN001, ANN205
        qg, sg, qu, su, gates = ctx.saved_tensors
        with torch.enable_grad():
            g, u = (dequantize_tiles(q.float(), s).requires_grad_() for q, s in ((qg, sg), (qu, su)))
            leaves = (g, u) if gates is None else (g, u, gates.detach().requires_grad_())
            grads = torch.autograd.grad(swiglu_plain(*leaves), leaves, dh.float())
        dg_gates = None if gates is None else grads[2].to(gates.dtype)
        return grads[0].to(ctx.dtype), grads[1].to(ctx.dtype), dg_gates


def swiglu_fp8_cached(
    gate: torch.Tensor, up: torch.Tensor, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """`swiglu_act` keeping only the FP8 tiles of its inputs for backward (`_SwiGLUFromFP8`); widths that
    128 does not divide keep their inputs as they are."""
    if gate.shape[-1] % TILE:
        return swiglu_act(gate, up, gates)
    return _SwiGLUFromFP8.apply(gate, up, gates)

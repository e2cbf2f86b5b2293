"""Grouped FP8 GEMMs with DeepSeek-V3's scales, for every expert in one launch, in Triton.

The routed experts' rows are grouped by expert, each group padded to a multiple of 128 rows
(ops/fp8_experts.py). Two kernels cover the three GEMMs of a grouped linear:
- `m_grouped_mm` (Fprop, Dgrad): out[m] = a[m] @ b[e(m)].T over each 128-row tile's expert, a in 1×128 tiles
  along K, b in 128×128 blocks;
- `k_grouped_mm` (Wgrad): out[e] = a[:, rows of e] @ b[:, rows of e].T, both operands in 1×128 tiles along
  the rows (the tokens), each group reducing over its own rows.

Each takes the groups as device tensors (the expert of each 128-row tile; each group's first and end row), so
nothing is read on the host and the shapes do not depend on the routing: a step with FP8 experts can be
captured in a CUDA graph. Each 128-wide slice of the reduction is one FP8 product, scaled by its two
operands' scales and added to an fp32 accumulator: the recipe's promotion every 128 elements, the same sum
`ops.fp8.blockwise_mm` (the reference) makes. Deterministic: a fixed loop order, no atomics.

Why our own kernel: torch 2.11 has a block-scaled `_scaled_mm` for one GEMM and a row-wise
`_scaled_grouped_mm`, torchao 0.17 block-scaled dense GEMMs only; DeepGEMM's grouped GEMMs (not on PyPI) were
wrong on the GPU at reduction widths that are not multiples of 512 (docs/performance.md, "FP8 GEMMs").
docs/architecture.md records the choice. CPU tests run these kernels in Triton's interpreter against the
reference.
"""

from __future__ import annotations

import functools
import os

import torch

from .gather_triton import available

TILE = 128  # the recipe's tile: scales step every 128 elements along a reduction, groups align to it


def runs_on(device: torch.device) -> bool:
    """Whether these kernels run for tensors on `device`: an FP8-capable GPU (SM89 and later) with Triton, or
    the CPU under Triton's interpreter (the tests)."""
    if not available():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _configs(kind: str) -> list:
    import triton

    if kind == "m":
        shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4), (64, 256, 4, 3)]
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes
        ]
    shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


@functools.cache
def _kernels(interpreted: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def m_grouped_kernel(
        a_ptr, sa_ptr, b_ptr, sb_ptr, tile_ptr, out_ptr, N, K,
        s_am, s_ak, s_sam, s_sak, s_be, s_bn, s_bk, s_sbe, s_sbn, s_sbk, s_om, s_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        e = tl.load(tile_ptr + (pid_m * BLOCK_M) // BLOCK_K)  # BLOCK_M divides the 128-row tile
        steps = tl.where(e >= 0, K // BLOCK_K, 0)  # a tile past every group: zeros
        e = tl.maximum(e, 0).to(tl.int64)
        a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
        b_ptrs = b_ptr + e * s_be + rn[None, :] * s_bn + rk[:, None] * s_bk
        sa_ptrs = sa_ptr + rm * s_sam
        sb_ptrs = sb_ptr + e * s_sbe + (rn // BLOCK_K) * s_sbn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, steps):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            sa = tl.load(sa_ptrs + kb * s_sak)
            sb = tl.load(sb_ptrs + kb * s_sbk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
        out_ptrs = out_ptr + rm[:, None] * s_om + rn[None, :] * s_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])

    @triton.jit
    def k_grouped_kernel(
        a_ptr, sa_ptr, b_ptr, sb_ptr, start_ptr, end_ptr, out_ptr, N, K,
        s_an, s_am, s_san, s_sam, s_bk, s_bm, s_sbk, s_sbm, s_oe, s_on, s_ok,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.program_id(2).to(tl.int64)
        start = tl.load(start_ptr + e).to(tl.int64)
        end = tl.load(end_ptr + e).to(tl.int64)
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # times a row stride of M: 64-bit
        rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        rr = tl.arange(0, BLOCK_R)
        n_ok, k_ok = rn < N, rk < K
        a_ptrs = a_ptr + rn[:, None] * s_an + (start + rr)[None, :] * s_am
        b_ptrs = b_ptr + rk[None, :] * s_bk + (start + rr)[:, None] * s_bm
        sa_ptrs = sa_ptr + rn * s_san + (start // BLOCK_R) * s_sam
        sb_ptrs = sb_ptr + rk * s_sbk + (start // BLOCK_R) * s_sbm
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for _ in range(0, (end - start) // BLOCK_R):
            a = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
            sa = tl.load(sa_ptrs, mask=n_ok, other=0.0)
            sb = tl.load(sb_ptrs, mask=k_ok, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
            a_ptrs += BLOCK_R * s_am
            b_ptrs += BLOCK_R * s_bm
            sa_ptrs += s_sam
            sb_ptrs += s_sbm
        out_ptrs = out_ptr + e * s_oe + rn[:, None] * s_on + rk[None, :] * s_ok
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])

    if interpreted:  # one small configuration: the interpreter runs every program in Python
        return m_grouped_kernel, k_grouped_kernel
    tuned_m = triton.autotune(_configs("m"), key=["N", "K"])(m_grouped_kernel)
    tuned_k = triton.autotune(_configs("k"), key=["N", "K"])(k_grouped_kernel)
    return tuned_m, tuned_k


def m_grouped_mm(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    tile_expert: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out[m, n] = Σ_k a[m, k]·b[e, n, k] in FP8 with the recipe's scales, e = tile_expert[m // 128].

    a: [M, K] E4M3, M a multiple of 128; sa: [M, K/128] its 1×128 tiles' scales. b: [E, N, K] E4M3 (K
    contiguous, as an FP8 tensor-core operand needs); sb: [E, N/128, K/128] its blocks' scales. tile_expert:
    [M/128] int32, -1 for tiles past every group (their rows come out 0). K and N multiples of 128. Any
    strides for a and the scales. [M, N] in out_dtype.
    """
    m, k = a.shape
    n = b.shape[1]
    if m % TILE or k % TILE or n % TILE or b.shape[2] != k or tile_expert.shape[0] != m // TILE:
        tiles = tile_expert.shape[0]
        raise ValueError(f"m_grouped_mm: a {tuple(a.shape)}, b {tuple(b.shape)}, {tiles} tile experts")
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    interpreted = not a.is_cuda
    kernel = _kernels(interpreted)[0]
    args = (a, sa, b, sb, tile_expert, out, n, k, *a.stride(), *sa.stride(), *b.stride(), *sb.stride())
    if interpreted:
        grid = (n // TILE, m // TILE)
        kernel[grid](*args, *out.stride(), BLOCK_M=TILE, BLOCK_N=TILE, BLOCK_K=TILE)
    else:
        import triton

        def grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(n, meta["BLOCK_N"]), m // meta["BLOCK_M"]

        kernel[grid](*args, *out.stride(), BLOCK_K=TILE)
    return out


def k_grouped_mm(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out[e, n, k] = Σ_{starts[e] ≤ m < ends[e]} a[n, m]·b[k, m] in FP8 with 1×128 scales along m.

    a: [N, M] E4M3 and sa: [N, M/128]; b: [K, M] E4M3 and sb: [K, M/128] (m contiguous in both values, as
    FP8 tensor-core operands need). starts, ends: [E] int32 multiples of 128 (an empty group gives zeros).
    [E, N, K] in out_dtype.
    """
    n, m = a.shape
    k = b.shape[0]
    if m % TILE or b.shape[1] != m:
        raise ValueError(f"k_grouped_mm: a {tuple(a.shape)}, b {tuple(b.shape)}")
    n_groups = starts.shape[0]
    out = torch.empty(n_groups, n, k, dtype=out_dtype, device=a.device)
    if n_groups == 0 or n == 0 or k == 0:
        return out
    interpreted = not a.is_cuda
    kernel = _kernels(interpreted)[1]
    args = (a, sa, b, sb, starts, ends, out, n, k, *a.stride(), *sa.stride(), *b.stride(), *sb.stride())
    if interpreted:
        grid = (-(-k // TILE), -(-n // TILE), n_groups)
        kernel[grid](*args, *out.stride(), BLOCK_N=TILE, BLOCK_K=TILE, BLOCK_R=TILE)
    else:
        import triton

        def grid(meta: dict) -> tuple[int, int, int]:
            return triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]), n_groups

        kernel[grid](*args, *out.stride(), BLOCK_R=TILE)
    return out

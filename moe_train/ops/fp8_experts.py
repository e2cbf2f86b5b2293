"""The routed experts in FP8 (DeepSeek-V3's recipe, ops/fp8.py): rows grouped by expert, each group padded to
128 rows, both projections' three GEMMs per group.

Three implementations of a grouped FP8 linear, with the same operands and the same semantics:
- `_FP8GroupedLinear`: one block-scaled GEMM per expert (`fp8_kernels(x).mm`: `torch._scaled_mm` on SM90,
  `blockwise_mm` elsewhere), every cast made once over all rows. It runs everywhere and is the reference.
- `_TritonGroupedLinear`: one Triton kernel per GEMM for all experts (ops/fp8_grouped_triton.py), the groups
  laid out on the device (`group_layout`), so nothing is read on the host and a layer with FP8 experts can be
  captured. It runs on FP8 GPUs with Triton, and on CPU under Triton's interpreter (the tests).
- `_DeepGEMMGroupedLinear`: one kernel per GEMM for all experts, through DeepGEMM (deepseek-ai/DeepGEMM,
  DeepSeek's kernel library for this recipe), where it is installed on an SM90 GPU. Neither torch nor torchao
  has a grouped GEMM with the recipe's 1×128 / 128×128 scales for SM90, and the per-expert loop's GEMMs are
  each too small to fill the GPU. DeepGEMM's Fprop and Dgrad are m-grouped GEMMs over the 128-row groups (a
  group id per row); its SM90 Wgrad is a k-grouped GEMM reducing over each group's rows, which reads each
  group's operands as their own K-major block, laid out here. The CPU tests hold this path to the loop
  through a plain-torch twin of DeepGEMM's two calls (tests/deep_gemm_twin.py).
"""

from __future__ import annotations

import functools
import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import fp8_grouped_triton as fgt
from .fp8 import REFERENCE, TILE, FP8Kernels, cast_blocks, fp8_kernels, fp8_roundtrip
from .fused import swiglu_act


class _FP8GroupedLinear(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e].T for rows grouped by expert, each group padded to a
    multiple of 128 (`bounds`: the groups' row ranges, on the host): `_FP8Linear`'s three GEMMs per group,
    with every cast made once over all rows (the groups' 1×128 tiles are the same, and the token tiles of
    Wgrad never straddle a group)."""

    @staticmethod
    def forward(ctx, x, w, bounds):  # noqa: ANN001, ANN205 - x [M, K], w [E, N, K]
        k = ctx.kernels = fp8_kernels(x)
        a = k.act(x)
        ctx.save_for_backward(*k.act_tokens(x), w)
        ctx.bounds, ctx.x_dtype = bounds, x.dtype
        y = x.new_empty(x.shape[0], w.shape[1])
        for e, (r0, r1) in enumerate(bounds):
            if r1 > r0:
                y[r0:r1] = k.mm(k.rows(a, r0, r1), k.weight(w[e]), x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        qx, sx, w = ctx.saved_tensors
        k = ctx.kernels
        dy = dy.contiguous()
        a, a_t = k.act(dy), k.act_tokens_t(dy)
        dx = dy.new_zeros(dy.shape[0], w.shape[2], dtype=ctx.x_dtype)
        dw = torch.zeros_like(w)
        for e, (r0, r1) in enumerate(ctx.bounds):
            if r1 > r0:
                dx[r0:r1] = k.mm(k.rows(a, r0, r1), k.weight_t(w[e]), ctx.x_dtype)
                dw[e] = k.mm(k.tokens_a(a_t, r0, r1), k.tokens_b((qx, sx), r0, r1), w.dtype)
        return dx, dw, None


@functools.cache
def _deep_gemm() -> Any:
    try:
        return importlib.import_module("deep_gemm")
    except Exception:  # noqa: BLE001 - absent, or built for another torch: the loop serves
        return None


def deep_gemm_widths(*ks: int) -> bool:
    """The reduction widths DeepGEMM's grouped FP8 GEMMs computed right on the GPU: multiples of 4·128."""
    return all(k % (4 * TILE) == 0 for k in ks)


def deep_gemm_available(x: torch.Tensor, *ks: int) -> bool:
    """Whether DeepGEMM runs x's grouped FP8 GEMMs: bf16 rows (its outputs are bf16) on an SM90 GPU with
    `deep_gemm` installed, whose contiguous layout's group alignment divides the recipe's 128-row groups, and
    every reduction width in `ks` (the projections' input widths and the gate-up output width) a multiple of
    4·128. Narrower multiples of 128 gave wrong results on the GPU against the per-expert GEMMs on the same
    FP8 operands (widths 1408 and 2816: docs/performance.md, "FP8 GEMMs"): the scales' layout those calls
    are given is then not the one DeepGEMM reads, so the per-expert GEMMs serve them."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] == 9):
        return False
    if not deep_gemm_widths(*ks):
        return False
    dg = _deep_gemm()
    return dg is not None and TILE % dg.get_mk_alignment_for_contiguous_layout() == 0


def _blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's w [E, N, K] in 128×128 blocks at once (N divides by 128, so no block straddles two
    experts): E4M3 values [E, N, K] and scales [E, N/128, K/128]."""
    e, n, k = w.shape
    q, s = cast_blocks(w.reshape(e * n, k))
    return q.view(e, n, k), s.view(e, n // TILE, k // TILE)


def _group_blocks(
    t: tuple[torch.Tensor, torch.Tensor], bounds: list[tuple[int, int]]
) -> tuple[torch.Tensor, ...]:
    """A Wgrad operand tiled along the tokens, (values [C, M], scales [C, M/128]), as DeepGEMM's SM90
    k-grouped GEMM reads it: each group's columns [C, r1 - r0] as a K-major block of its own, the blocks one
    after another (flat); the scales stay [C, M/128], each group's 128-token tiles in its own columns."""
    q, s = t
    return torch.cat([q[:, r0:r1].reshape(-1) for r0, r1 in bounds]), s


class _DeepGEMMGroupedLinear(torch.autograd.Function):
    """`_FP8GroupedLinear` with each of its three GEMMs one DeepGEMM call for all experts. The casts are the
    reference's (compiled on CUDA): their operands' layouts are the ones DeepGEMM's calls are written for
    here (row-major values, scales indexed like the values' tiles; DeepGEMM lays scales out itself)."""

    @staticmethod
    def forward(ctx, x, w, bounds):  # noqa: ANN001, ANN205 - x [M, K], w [E, N, K]
        dg, k = _deep_gemm(), REFERENCE
        ctx.sizes = [r1 - r0 for r0, r1 in bounds]
        ids = torch.arange(len(bounds), dtype=torch.int32).repeat_interleave(torch.tensor(ctx.sizes))
        ctx.ids = ids.to(x.device, non_blocking=True)  # each row's group, as the m-grouped GEMMs take it
        ctx.save_for_backward(*k.act_tokens(x), w)
        ctx.bounds, ctx.x_dtype = bounds, x.dtype
        y = x.new_empty(x.shape[0], w.shape[1])
        dg.m_grouped_fp8_gemm_nt_contiguous(k.act(x), _blocks(w), y, ctx.ids, disable_ue8m0_cast=True)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        qx, sx, w = ctx.saved_tensors
        dg, k = _deep_gemm(), REFERENCE
        dy = dy.contiguous()
        dx = dy.new_empty(dy.shape[0], w.shape[2], dtype=ctx.x_dtype)
        # Dgrad: dy @ w[e], the transposed weight's blocks being the weight's blocks transposed
        dg.m_grouped_fp8_gemm_nt_contiguous(
            k.act(dy), _blocks(w.transpose(1, 2).contiguous()), dx, ctx.ids, disable_ue8m0_cast=True
        )
        # Wgrad: dy_e.T @ x_e, reducing over each group's rows (fp32 out, added to the zeros it starts from)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        dg.k_grouped_fp8_gemm_nt_contiguous(
            _group_blocks(k.act_tokens_t(dy), ctx.bounds),
            _group_blocks((qx, sx), ctx.bounds),
            dw,
            ctx.sizes,
            torch.tensor(ctx.sizes, dtype=torch.int32).to(w.device, non_blocking=True),
            c=dw,
        )
        return dx, dw.to(w.dtype), None


@dataclass(frozen=True)
class GroupLayout:
    """Rows sorted by expert, spread to groups padded to multiples of 128 rows in a buffer whose size depends
    on the row count only (not on the routing), every index made on the device: what the grouped Triton
    kernels (ops/fp8_grouped_triton.py) take, with no host read."""

    dest: torch.Tensor  # (M,) each sorted row's place in the buffer
    rows: int  # the buffer's rows: room for every group's padding whatever the counts
    tile_expert: torch.Tensor  # (rows/128,) int32: each 128-row tile's expert, -1 past every group
    starts: torch.Tensor  # (E,) int32: each group's first row
    ends: torch.Tensor  # (E,) int32: each group's end (start + its rows rounded up to 128)


def group_layout(counts: torch.Tensor, m: int) -> GroupLayout:
    """The padded layout of m rows sorted by expert, counts[e] of them expert e's. Rows past the counts' sum
    (a fixed-size dispatch buffer's tail) go after every group, into tiles of no expert: they come out 0."""
    n_exp, dev = counts.shape[0], counts.device
    padded = (counts + TILE - 1) // TILE * TILE
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    last = torch.cumsum(counts, 0)
    rows = -(-(m + (TILE - 1) * n_exp) // TILE) * TILE  # Σ ceil(c/128)·128 ≤ Σ c + 127 per group
    r = torch.arange(m, device=dev)
    expert = torch.searchsorted(last, r, right=True)  # n_exp for a tail row
    tail = expert >= n_exp
    expert = expert.clamp(max=n_exp - 1)
    dest = r - (last - counts)[expert] + starts[expert]
    dest = torch.where(tail, ends[-1] + r - last[-1], dest)
    tile_expert = torch.searchsorted(ends, torch.arange(0, rows, TILE, device=dev), right=True)
    tile_expert = torch.where(tile_expert < n_exp, tile_expert, -1).to(torch.int32)
    return GroupLayout(dest, rows, tile_expert, starts.to(torch.int32), ends.to(torch.int32))


def _stack_blocks(k: FP8Kernels, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's w [E, N, K] in 128×128 blocks by the kernel set's cast: values [E, N, K] (K contiguous)
    and scales [E, N/128, K/128]. torchao's block cast writes w.T column-major, which is w row-major."""
    e, n, kk = w.shape
    q, s = k.weight(w.reshape(e * n, kk))
    if k.name == "torchao":
        q, s = q.t(), s.t()
    return q.reshape(e, n, kk), s.reshape(e, n // TILE, kk // TILE)


def _token_tiles(cast: Callable, x: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A Wgrad operand: x [M, C] cut by `cast` into 1×128 tiles along the rows M, as values [C, M] with M
    contiguous (FP8 tensor-core operands run along their reduction) and scales [C, M/128]. `transposed`: the
    cast returns them indexed [M, C] (torchao's cast for Wgrad's b)."""
    q, s = cast(x)
    if transposed:
        q, s = q.t(), s.t()
    return q.contiguous(), s


class _TritonGroupedLinear(torch.autograd.Function):
    """`_FP8GroupedLinear` with each of its three GEMMs one Triton launch for all experts
    (`fp8_grouped_triton`), the groups given by a `GroupLayout` on the device: no host read, no per-expert
    launches. The casts are the kernel set's, made once over all rows; the weights' blocks are cast per call
    (and transposed for Dgrad), never kept."""

    @staticmethod
    def forward(ctx, x, w, layout):  # noqa: ANN001, ANN205 - x [rows, K], w [E, N, K]
        k = ctx.kernels = fp8_kernels(x)
        qa, sa = k.act(x)
        ctx.save_for_backward(*_token_tiles(k.act_tokens, x, k.name == "torchao"), w)
        ctx.layout, ctx.x_dtype = layout, x.dtype
        return fgt.m_grouped_mm(qa, sa, *_stack_blocks(k, w), layout.tile_expert, x.dtype)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        qx, sx, w = ctx.saved_tensors
        k, layout = ctx.kernels, ctx.layout
        dy = dy.contiguous()
        qw, sw = _stack_blocks(k, w)  # Dgrad's b: w[e].T's blocks are w[e]'s blocks transposed
        qd, sd = k.act(dy)
        dx = fgt.m_grouped_mm(
            qd, sd, qw.transpose(1, 2).contiguous(), sw.transpose(1, 2), layout.tile_expert, ctx.x_dtype
        )
        qt, st = _token_tiles(k.act_tokens_t, dy, False)
        dw = fgt.k_grouped_mm(qt, st, qx, sx, layout.starts, layout.ends, w.dtype)
        return dx, dw, None


def fp8_experts_on_device(device: torch.device) -> bool:
    """Whether `expert_swiglu_fp8` runs experts on `device` with every index on the device (the grouped
    Triton kernels): then it reads nothing on the host and takes a fixed-size buffer's tail rows as they
    are, so a step can be captured in a CUDA graph."""
    return fgt.runs_on(device)


def expert_swiglu_fp8(
    x: torch.Tensor,
    counts: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Callable = swiglu_act,
    taps: list | None = None,
    gates: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """`ops.grouped_gemm.expert_swiglu` with both projections in FP8. The rows (sorted by expert) are taken as
    FP8 dispatch delivers them (`fp8_roundtrip`) in every layout, so that Wgrad's token tiles are cut from the
    same values with or without an exchange, and are spread to groups padded to multiples of 128, so that each
    expert's token tiles are its own: this equals the per-expert loop (`expert_swiglu_reference` with
    `fp8_linear`) on those rows.

    kernel: `triton` (`_TritonGroupedLinear`: the groups laid out on the device, nothing read on the host, x
    may end in tail rows past the counts' sum), `deep_gemm` (`_DeepGEMMGroupedLinear`), `per_expert`
    (`_FP8GroupedLinear`), or `auto`: triton where it runs (`fp8_experts_on_device`), else DeepGEMM where it
    runs, else per expert. The last two read the counts on the host and take exactly their sum of rows.
    """
    widths = (x.shape[1], w_gate_up.shape[1], w_down.shape[2])  # the GEMMs' K: Fprop and Dgrad of both
    if kernel == "auto" and fp8_experts_on_device(x.device):
        kernel = "triton"
    elif kernel == "auto":
        kernel = "deep_gemm" if deep_gemm_available(x, *widths) else "per_expert"
    x = fp8_roundtrip(x)
    if kernel == "triton":
        layout = group_layout(counts, x.shape[0])
        dest, rows = layout.dest, layout.rows
        linear, groups = _TritonGroupedLinear, layout
    else:
        sizes = counts.tolist()
        bounds, start, shifts = [], 0, []
        for size, taken in zip(sizes, itertools.accumulate([0, *sizes]), strict=False):
            bounds.append((start, start + -(-size // TILE) * TILE))
            shifts.append(start - taken)  # how far this expert's rows move
            start = bounds[-1][1]
        dest = torch.arange(x.shape[0]) + torch.tensor(shifts).repeat_interleave(torch.tensor(sizes))
        dest, rows = dest.to(x.device), start
        linear = _DeepGEMMGroupedLinear if kernel == "deep_gemm" else _FP8GroupedLinear
        groups = bounds
    x_p = x.new_zeros(rows, x.shape[1]).index_copy(0, dest, x)
    if gates is not None:  # the padding rows' gates are 0: they add nothing, and get no gradient
        gates = gates.new_zeros(rows).index_copy(0, dest, gates)
    gu = linear.apply(x_p, w_gate_up, groups)
    g, u = gu.chunk(2, dim=-1)
    y = linear.apply(act(g, u, gates), w_down, groups)
    if taps is not None:
        taps += [(gu, w_gate_up), (y, w_down)]
    return y[dest]

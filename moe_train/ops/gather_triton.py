"""Triton kernels behind `gather.bag_sum` and `gather.gather_rows` on CUDA: one pass over the rows that exist.

The broadcast multiply and strided sum that `(rows[idx].view(R, K, H) * w[..., None]).sum(1)` costs on a GPU
run as generic TensorIterator kernels over every slot, masked ones included (the timings:
docs/performance.md, "Expert-parallel dispatch"). Here each program reads the rows of one bag (and one column
block) once, with 16-byte loads, multiplies and adds in fp32 in bag order, and writes one row:
deterministic, no atomics. `gather.py` holds the reference (`embedding_bag`) and the autograd;
bench/ep_dispatch.py compares the two on the GPU.

The bag sum also reads its rows from several tensors of one shape through a table of their addresses
(`bag_sum_from`): each position names its source too. Peers' buffers mapped by CUDA symmetric memory are
such tensors, so one kernel reads every peer's rows in one pass.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def bag_sum_kernel(
        src_ptr,
        idx_ptr,
        w_ptr,
        off_ptr,
        out_ptr,
        H,
        src_stride,
        out_stride,
        PAD,
        from_ptr,
        HAS_W: tl.constexpr,
        HAS_OFF: tl.constexpr,
        FROM_TABLE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        bag = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < H
        if HAS_OFF:
            start = tl.load(off_ptr + bag)
            end = tl.load(off_ptr + bag + 1)
        else:
            start = bag
            end = bag + 1
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(start, end):
            row = tl.load(idx_ptr + i)
            keep = cmask & (cols * 0 + row != PAD)  # a padding position adds nothing; its row is never read
            if FROM_TABLE:  # src_ptr: the sources' addresses; from_ptr: each position's source
                at = tl.load(src_ptr + tl.load(from_ptr + i)).to(tl.pointer_type(out_ptr.dtype.element_ty))
            else:
                at = src_ptr
            v = tl.load(at + row * src_stride + cols, mask=keep, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + i).to(tl.float32)
            acc += v
        tl.store(out_ptr + bag * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def bag_dots_kernel(
        g_ptr, src_ptr, idx_ptr, off_ptr, out_ptr, H, g_stride, src_stride, PAD, BLOCK: tl.constexpr
    ):
        bag = tl.program_id(0).to(tl.int64)
        start = tl.load(off_ptr + bag)
        end = tl.load(off_ptr + bag + 1)
        for i in range(start, end):
            row = tl.load(idx_ptr + i)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for h in range(0, H, BLOCK):
                cols = h + tl.arange(0, BLOCK)
                m = cols < H
                a = tl.load(g_ptr + bag * g_stride + cols, mask=m, other=0.0).to(tl.float32)
                b = tl.load(src_ptr + row * src_stride + cols, mask=m & (cols * 0 + row != PAD), other=0.0)
                b = b.to(tl.float32)
                acc += a * b
            tl.store(out_ptr + i, tl.sum(acc, axis=0))

    @triton.jit
    def bag_scatter_kernel(
        src_ptr, idx_ptr, off_ptr, out_ptr, H, src_stride, out_stride, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < H
        start = tl.load(off_ptr + row)
        end = tl.load(off_ptr + row + 1)
        v = tl.load(src_ptr + row * src_stride + cols, mask=cmask, other=0.0)
        for i in range(start, end):
            pos = tl.load(idx_ptr + i)
            tl.store(out_ptr + pos * out_stride + cols, v, mask=cmask)

    return bag_sum_kernel, bag_dots_kernel, bag_scatter_kernel


def _block(hidden: int) -> tuple[int, int]:
    """Column block (≤ 1024 elements, 16-byte loads per thread for bf16) and warps."""
    import triton

    block = min(1024, triton.next_power_of_2(hidden))
    return block, max(1, min(4, block // 256))


def _rows(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{what}: expected (rows, hidden), got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def _bag_sum(
    src: torch.Tensor,
    like: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor | None,
    weight: torch.Tensor | None,
    pad: int | None,
    source: torch.Tensor | None,
) -> torch.Tensor:
    """The bag-sum kernel's launch: rows of `src`, or (with `source`) of the tensors whose addresses `src`
    holds; `like`: a (rows, hidden) tensor shaped as they are, whose dtype the sums are written in."""
    import triton

    index = index.contiguous()
    n_bags = index.shape[0] if offsets is None else offsets.shape[0] - 1
    hidden = like.shape[1]
    out = torch.empty(n_bags, hidden, dtype=like.dtype, device=like.device)
    if n_bags == 0 or hidden == 0:
        return out
    block, warps = _block(hidden)
    _kernels()[0][(n_bags, triton.cdiv(hidden, block))](
        src,
        index,
        index if weight is None else weight.contiguous(),
        index if offsets is None else offsets.contiguous(),
        out,
        hidden,
        like.stride(0),
        out.stride(0),
        -1 if pad is None else pad,
        index if source is None else source.contiguous(),
        HAS_W=weight is not None,
        HAS_OFF=offsets is not None,
        FROM_TABLE=source is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return out


def bag_sum(
    src: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor | None,
    weight: torch.Tensor | None,
    pad: int | None = None,
) -> torch.Tensor:
    """out[b] = Σ_{i in bag b} weight[i]·src[index[i]]; offsets None: bag b is position b (scaled gather);
    positions naming row `pad` add nothing (`gather.Bags.pad`)."""
    src = _rows(src, "bag_sum src")
    return _bag_sum(src, src, index, offsets, weight, pad, None)


def bag_sum_from(
    table: torch.Tensor,
    like: torch.Tensor,
    source: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor | None,
    pad: int | None = None,
) -> torch.Tensor:
    """out[b] = Σ_{i in bag b} S[source[i]][index[i]], where table[s] (int64, on the device) is the address
    of source tensor S[s], each shaped like `like` (a contiguous (rows, hidden) tensor); offsets None: bag b
    is position b (a gather). Positions naming row `pad` add nothing. The sum is fp32, written in `like`'s
    dtype."""
    if like.dim() != 2 or not like.is_contiguous():
        raise ValueError(f"bag_sum_from: sources must be contiguous (rows, hidden), got {tuple(like.shape)}")
    return _bag_sum(table, like, index, offsets, None, pad, source)


def bag_dots(
    g: torch.Tensor, src: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, pad: int | None = None
) -> torch.Tensor:
    """d[i] = <g[b], src[index[i]]> (fp32) for every position i of every bag b; 0 where index[i] = pad."""
    g, src = _rows(g, "bag_dots g"), _rows(src, "bag_dots src")
    out = torch.empty(index.shape[0], dtype=torch.float32, device=src.device)
    n_bags = offsets.shape[0] - 1
    if n_bags == 0 or index.shape[0] == 0:
        return out.zero_()
    block, warps = _block(src.shape[1])
    kernel = _kernels()[1]
    kernel[(n_bags,)](
        g,
        src,
        index.contiguous(),
        offsets.contiguous(),
        out,
        src.shape[1],
        g.stride(0),
        src.stride(0),
        -1 if pad is None else pad,
        BLOCK=block,
        num_warps=warps,
    )
    return out


def bag_scatter(src: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, n_out: int) -> torch.Tensor:
    """out[index[i]] = src[j] for every position i of bag j: a gather written from the source side, each
    source row read once however many copies it makes (every output position in exactly one bag)."""
    import triton

    src = _rows(src, "bag_scatter src")
    hidden = src.shape[1]
    out = torch.empty(n_out, hidden, dtype=src.dtype, device=src.device)
    n_rows = offsets.shape[0] - 1
    if n_rows == 0 or n_out == 0 or hidden == 0:
        return out
    block, warps = _block(hidden)
    _kernels()[2][(n_rows, triton.cdiv(hidden, block))](
        src,
        index.contiguous(),
        offsets.contiguous(),
        out,
        hidden,
        src.stride(0),
        out.stride(0),
        BLOCK=block,
        num_warps=warps,
    )
    return out

"""Row gathers and bag sums whose backward passes are gathers too: fast on GPUs, deterministic everywhere.

Moving token rows to experts and back is a gather in the forward pass. Autograd's backward of a gather is a
scatter-add (index_add_/index_put_): atomics on CUDA (slow for bf16 rows) and a thread-dependent summation
order on CPU, which broke bit-exact resumption. Every gather here comes with its inverse map as `Bags`: for
each source row, the output positions that copied it, so the backward sums those in a fixed order.

The reductions go the other way: `bag_sum` adds (optionally gate-weighted) gathered rows per bag — a
token's expert outputs, a token's partial sums from several ranks — reading only the rows that exist, in one
pass (no (rows, K, hidden) intermediate, no masked slots, no broadcast multiply). Products and sums are in
fp32 and the result is rounded once to the rows' dtype. On CUDA with Triton, for tensors large enough to
repay a Triton launch, small kernels do it (`gather_triton.py`); elsewhere `embedding_bag` (the same sums in
the same order; it takes the weights in the rows' dtype, so weighted bf16 rows go through it in fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Bags:
    """Groups of positions: bag b owns positions offsets[b] : offsets[b + 1], position i names row index[i].

    index: (L,) int64 source row of each position; offsets: (B + 1,) int64, offsets[0] = 0, offsets[B] = L;
    owner: (L,) int64 bag of each position (the reference path and some plans need it).
    pad: a source row index that marks a position as padding: it adds nothing, its weight gets no gradient,
    and the row itself is never read (it may hold anything). Fixed-shape plans need it: bags of a fixed
    length whose number of real positions only the device knows (parallel/dispatch/bounded.py).
    """

    index: torch.Tensor
    offsets: torch.Tensor
    owner: torch.Tensor
    pad: int | None = None

    @property
    def n_bags(self) -> int:
        return self.offsets.shape[0] - 1


def sort_keys(key: torch.Tensor, bound: int) -> torch.Tensor:
    """argsort(key, stable=True) for integer keys in [0, bound]: the keys sorted as int16 where they fit
    (expert ids), int32 else. A GPU radix sort makes one pass per digit of the key's width, so narrow keys
    take a fraction of int64's passes; the order is the same."""
    narrow = torch.int16 if bound < 2**15 else torch.int32 if bound < 2**31 else torch.int64
    return torch.argsort(key.to(narrow), stable=True)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in its accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# A Triton launch costs far more host time than a torch op, so below this size the torch ops finish first;
# above it the kernels' single pass wins (bag_sum reads each row once instead of embedding_bag's several
# passes; gather_rows writes copies from the source side, where index_select re-reads a row copied several
# times), and a step captured in a CUDA graph pays no launch at all. The bandwidths behind it:
# docs/performance.md, "Expert-parallel dispatch" and "Sync-free dispatch on one GPU".
TRITON_BYTES = 64 << 20


def _triton_ok(t: torch.Tensor, nbytes: int) -> bool:
    if not t.is_cuda or nbytes < TRITON_BYTES:
        return False
    from . import gather_triton

    return gather_triton.available()


def _nbytes(rows: int, like: torch.Tensor) -> int:
    """Bytes of `rows` rows shaped like `like`'s."""
    return rows * math.prod(like.shape[1:]) * like.element_size()


def sum_bags(src: torch.Tensor, bags: Bags, weight: torch.Tensor | None) -> torch.Tensor:
    """out[b] = Σ_{i in bag b} weight[i]·src[index[i]], fp32 products and sum; no autograd (`bag_sum` is the
    autograd form; a transport whose hops move the gradients themselves calls this)."""
    hidden = src.shape[1]
    if bags.index.shape[0] == 0 or src.shape[0] == 0:
        return src.new_zeros(bags.n_bags, hidden)
    if _triton_ok(src, _nbytes(bags.index.shape[0], src)):
        from .gather_triton import bag_sum

        return bag_sum(src, bags.index, bags.offsets, weight, bags.pad)
    if weight is not None and src.element_size() < 4:
        # embedding_bag takes its weights in the rows' dtype: rounding fp32 gate weights to bf16 would break
        # the fp32 products the kernels compute, so reduced-precision rows are weighed in fp32
        return sum_bags(src.float(), bags, weight.float()).to(src.dtype)
    w = None if weight is None else weight.to(src.dtype)
    return F.embedding_bag(
        bags.index,
        src,
        bags.offsets,
        mode="sum",
        per_sample_weights=w,
        include_last_offset=True,
        padding_idx=bags.pad,  # excluded from the sums: the row is never read
    )


def _gather(x: torch.Tensor, index: torch.Tensor, back: Bags) -> torch.Tensor:
    """x[index] (rows, no autograd); back: the inverse map (see `gather_rows`). Where every position is in a
    bag it writes from the source side, each source row read once (padding positions would stay unwritten)."""
    if x.shape[0] == 0:  # nothing to copy (only an empty output can point into an empty source)
        return x.new_zeros(index.shape[0], *x.shape[1:])
    if back.pad is None and _triton_ok(x, _nbytes(index.shape[0], x)):
        from .gather_triton import bag_scatter

        flat = x.flatten(1) if x.dim() > 1 else x.unsqueeze(1)
        out = bag_scatter(flat, back.index, back.offsets, index.shape[0])
        return out.view(index.shape[0], *x.shape[1:])
    return x.index_select(0, index)


def _scaled_rows(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[j] = weight[j]·src[index[j]] (no autograd): a gather, scaled in fp32."""
    if index.shape[0] == 0 or src.shape[0] == 0:
        return src.new_zeros(index.shape[0], src.shape[1])
    if _triton_ok(src, _nbytes(index.shape[0], src)):
        from .gather_triton import bag_sum

        return bag_sum(src, index, None, weight)
    return (_acc(src.index_select(0, index)) * _acc(weight).unsqueeze(1)).to(src.dtype)


def _bag_dots(g: torch.Tensor, src: torch.Tensor, bags: Bags) -> torch.Tensor:
    """d[i] = <g[owner[i]], src[index[i]]> (fp32, or fp64 for fp64 rows): the gradient of the weight at
    position i."""
    if bags.index.shape[0] == 0 or src.shape[0] == 0:
        return torch.zeros(bags.index.shape[0], dtype=_acc(src).dtype, device=src.device)
    if _triton_ok(src, _nbytes(bags.index.shape[0], src)):
        from .gather_triton import bag_dots

        return bag_dots(g, src, bags.index, bags.offsets, bags.pad)
    d = (_acc(g.index_select(0, bags.owner)) * _acc(src.index_select(0, bags.index))).sum(1)
    if bags.pad is None:
        return d
    return torch.where(bags.index == bags.pad, 0.0, d)  # `where`: the padding row may hold NaN


@dataclass(frozen=True)
class Sources:
    """Tensors of one shape to read rows from (every rank's buffer, say), and, for tensors on CUDA, a device
    table of their addresses (int64), with which one Triton kernel reads rows from any of them in one pass
    (else: a pass per tensor)."""

    tensors: list[torch.Tensor]
    table: torch.Tensor | None = None

    def _kernel(self) -> bool:
        if self.table is None or not self.tensors[0].is_cuda:
            return False
        from . import gather_triton

        return gather_triton.available()


def gather_from(src: Sources, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row j = src.tensors[source[j]][index[j]] (no autograd)."""
    if src._kernel():
        from .gather_triton import bag_sum_from

        return bag_sum_from(src.table, src.tensors[0], source, index, None)
    out = src.tensors[0].index_select(0, index)
    for s in range(1, len(src.tensors)):
        out = torch.where((source == s).unsqueeze(1), src.tensors[s].index_select(0, index), out)
    return out


def sum_bags_from(src: Sources, source: torch.Tensor, bags: Bags) -> torch.Tensor:
    """Bag b's sum of its positions' rows src.tensors[source[i]][bags.index[i]] in bag order, fp32 inside,
    the sources' dtype out; padding positions add nothing (no autograd)."""
    if src._kernel():
        from .gather_triton import bag_sum_from

        return bag_sum_from(src.table, src.tensors[0], source, bags.index, bags.offsets, bags.pad)
    if len(src.tensors) == 1:
        return sum_bags(src.tensors[0], bags, None)
    real = bags.index != bags.pad
    rows = gather_from(src, source, torch.where(real, bags.index, 0))
    rows = torch.where(real.unsqueeze(1), rows, 0)
    every = torch.arange(rows.shape[0], device=rows.device)
    return sum_bags(rows, Bags(every, bags.offsets, bags.owner), None)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, back: Bags) -> torch.Tensor:  # type: ignore[override]
        ctx.back = back
        ctx.rows = x.shape[0]
        return _gather(x, index, back)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        back: Bags = ctx.back
        flat = grad.flatten(1) if grad.dim() > 1 else grad.unsqueeze(1)
        out = sum_bags(flat, back, None).view(ctx.rows, *grad.shape[1:])
        return out, None, None


class _BagSum(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        src: torch.Tensor,
        weight: torch.Tensor | None,
        bags: Bags,
        src_bag: torch.Tensor,
        src_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.bags, ctx.src_bag, ctx.src_weight = bags, src_bag, src_weight
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.save_for_backward(src if weight is not None and ctx.needs_input_grad[1] else None)
        return sum_bags(src, bags, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (src,) = ctx.saved_tensors
        grad = grad.contiguous()
        g_src = None
        if ctx.needs_input_grad[0]:  # row j gets its bag's gradient: a gather whose inverse map is `bags`
            unweighted = ctx.src_weight is None
            g_src = (
                _gather(grad, ctx.src_bag, ctx.bags)
                if unweighted
                else _scaled_rows(grad, ctx.src_bag, ctx.src_weight)
            )
        g_w = None
        if src is not None and ctx.needs_input_grad[1]:
            g_w = _bag_dots(grad, src, ctx.bags).to(ctx.weight_dtype)
        return g_src, g_w, None, None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, back: Bags) -> torch.Tensor:
    """out = x[index] (rows).

    back: the inverse map — one bag per row of x, holding the positions of `out` that copied it (every
    position of `out` in exactly one bag). The gradient of row j is the sum of grad_out over its bag, in bag
    order.
    """
    return _GatherRows.apply(x, index, back)


def bag_sum(
    src: torch.Tensor, bags: Bags, src_bag: torch.Tensor, src_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """out[b] = Σ_{i in bag b} w[j]·src[j] with j = bags.index[i] and w = src_weight, each src row's own
    weight (None: 1), fp32 inside, src's dtype out.

    Every row of src must sit in exactly one bag position (the plans build such bags): then its gradient is
    one scaled row, grad_src[j] = w[j]·grad_out[src_bag[j]], with src_bag[j] the bag holding row j; and w[j]'s
    gradient is <grad_out[src_bag[j]], src[j]>. With `Bags.pad`, src_weight has a row for the padding index.
    """
    if src_weight is None:
        return _BagSum.apply(src, None, bags, src_bag, None)
    weight = src_weight.index_select(0, bags.index)  # per position; its gradient goes back to w
    return _BagSum.apply(src, weight, bags, src_bag, src_weight.detach())

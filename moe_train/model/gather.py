"""Row gathers whose backward is a gather too: fast on GPUs and deterministic everywhere.

Moving token rows to experts and back is a gather in the forward pass. Autograd's backward of a gather is a
scatter-add (index_add_/index_put_): atomics on CUDA (slow for bf16 rows) and a thread-dependent summation
order on CPU, which broke bit-exact resumption. Every gather here comes with the inverse map: for each row
of the source, the (at most F) output positions that copied it, so the backward gathers those and sums them
in a fixed order.
"""

from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        index: torch.Tensor,
        back_index: torch.Tensor,
        back_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(back_index, back_mask)
        ctx.rows = x.shape[0]
        if x.shape[0] == 0:  # only masked (unused) positions can point into an empty source
            return x.new_zeros(index.shape[0], *x.shape[1:])
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        back_index, back_mask = ctx.saved_tensors
        fan = back_index.shape[1]
        if grad.shape[0] == 0:
            return grad.new_zeros(ctx.rows, *grad.shape[1:]), None, None, None
        g = grad.index_select(0, back_index.reshape(-1)).view(ctx.rows, fan, *grad.shape[1:])
        if back_mask is not None:
            g = g * back_mask.view(ctx.rows, fan, *([1] * (grad.dim() - 1))).to(g.dtype)
        return (g.sum(1) if fan > 1 else g.squeeze(1)), None, None, None


def gather_rows(
    x: torch.Tensor, index: torch.Tensor, back_index: torch.Tensor, back_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """out = x[index].

    back_index: (len(x), F) — for each row of x, the positions in `out` holding a copy of it (any valid
    position where back_mask is False); back_mask: (len(x), F) bool, or None when every slot is used.
    The gradient of row i is the sum over its used slots f of grad_out[back_index[i, f]].
    """
    return _GatherRows.apply(x, index, back_index, back_mask)

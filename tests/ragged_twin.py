"""cuDNN's ragged attention on a CPU: the kernel's contract in plain torch, and a fixture that routes the
document masks through it, so the tests hold the packing and entries around the kernel (and the graphed
step's static entries) to the dense mask. The kernel itself is checked on a GPU by bench/doc_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


class RaggedTwin(torch.autograd.Function):
    """The cuDNN kernel's contract in plain torch: every entry (`cum`, `seq`) of the packed rows attends
    causally within itself. The entries must tile the rows they cover in order, each of at least one token;
    the rows after the last entry are left zero."""

    @staticmethod
    def forward(ctx, q, k, v, docs, scale):  # noqa: ANN001, ANN205
        ctx.save_for_backward(q, k, v)
        ctx.docs, ctx.scale = docs, scale
        with torch.enable_grad():
            return RaggedTwin._attend(q, k, v, docs, scale).detach()

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v = (x.detach().requires_grad_() for x in ctx.saved_tensors)
        with torch.enable_grad():
            o = RaggedTwin._attend(q, k, v, ctx.docs, ctx.scale)
        return (*torch.autograd.grad(o, (q, k, v), do), None, None)

    @staticmethod
    def _attend(q, k, v, docs, scale):  # noqa: ANN001, ANN205
        cum, seq = docs.cum.tolist(), docs.seq.flatten().tolist()
        assert len(cum) == docs.capacity + 1 and cum[0] == 0 and q.shape[0] == docs.packed_rows
        assert all(n >= 1 and cum[e + 1] - cum[e] == n for e, n in enumerate(seq)), (cum, seq)
        pieces = [
            F.scaled_dot_product_attention(
                *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale
            ).transpose(0, 1)
            for a, b in zip(cum[:-1], cum[1:], strict=True)
        ]
        pieces.append(v.new_zeros(q.shape[0] - cum[-1], *v.shape[1:]))
        return torch.cat(pieces)


@pytest.fixture
def ragged_twin(monkeypatch):
    """The cuDNN path switched on for CPU tensors, its kernel replaced by `RaggedTwin`."""
    from moe_train.model import documents
    from moe_train.ops import cudnn_attention

    monkeypatch.setattr(documents, "ragged_available", lambda device, dtype: True)
    monkeypatch.setattr(cudnn_attention, "_RaggedAttention", RaggedTwin)

"""The head's chunked cross-entropy (ops/cross_entropy.py): the plain op's values and gradients, several
chunks, per-token weights, autocast, and never the whole [tokens, vocab] logits at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.model import build_model
from moe_train.ops.cross_entropy import linear_cross_entropy
from tiny_cfg import TINY_MODEL

N, D, V = 45, 24, 70


def _inputs(dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    keep = (torch.rand(N, generator=g) > 0.3).float()
    return h, w, y, keep


def _plain(h, w, y, keep):
    ce = F.cross_entropy((h @ w.t()).float(), y, reduction="none")
    return (ce if keep is None else ce * keep).mean(), ce


@pytest.mark.parametrize("weighted", [False, True])
def test_equals_the_plain_op_in_fp32_over_several_chunks(weighted):
    h, w, y, keep = _inputs()
    keep = keep if weighted else None
    ref, ref_ce = _plain(h, w, y, keep)
    ref_grads = torch.autograd.grad(0.37 * ref, (h, w))
    loss, ce = linear_cross_entropy(h, w, y, keep, chunk_elements=8 * V)  # 6 chunks, the last one short
    grads = torch.autograd.grad(0.37 * loss, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not ce.requires_grad


def test_no_rows_give_a_zero_weight_gradient():
    h, w, y, _ = _inputs()
    loss, ce = linear_cross_entropy(h[:0], w, y[:0])
    (gw,) = torch.autograd.grad(loss, (w,))
    assert ce.shape == (0,) and torch.equal(gw, torch.zeros_like(w))


def test_without_grad_gives_the_same_losses():
    h, w, y, keep = _inputs()
    loss, ce = linear_cross_entropy(h, w, y, keep, chunk_elements=8 * V)
    with torch.no_grad():
        loss2, ce2 = linear_cross_entropy(h, w, y, keep, chunk_elements=8 * V)
    assert torch.equal(ce, ce2) and torch.equal(loss.detach(), loss2)


def test_bf16_error_is_no_worse_than_the_plain_bf16_ops():
    """Against an fp32 reference from the same (bf16-representable) inputs: the chunked op's error in loss and
    gradients stays within 1.5x the plain bf16 head's (bf16 logits, fp32 softmax)."""
    h, w, y, keep = _inputs(torch.bfloat16, seed=1)
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    ref, _ = _plain(h32, w32, y, keep)
    ref_grads = torch.autograd.grad(ref, (h32, w32))
    plain, _ = _plain(h, w, y, keep)
    plain_grads = torch.autograd.grad(plain, (h, w))
    ours, _ = linear_cross_entropy(h, w, y, keep, chunk_elements=8 * V)
    our_grads = torch.autograd.grad(ours, (h, w))
    assert all(g.dtype == torch.bfloat16 for g in our_grads)

    def err(a, b):
        return (a.float() - b).abs().max().item()

    assert err(ours, ref) <= 1.5 * err(plain, ref) + 1e-6
    for mine, theirs, want in zip(our_grads, plain_grads, ref_grads, strict=True):
        assert err(mine, want) <= 1.5 * err(theirs, want)


def test_under_autocast_runs_the_autocast_dtype_and_returns_fp32_gradients():
    h, w, y, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = _plain(h, w, y, None)
        loss, _ = linear_cross_entropy(h, w, y, chunk_elements=8 * V)
    assert loss.dtype == torch.float32
    ours, theirs = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(plain, (h, w))
    assert all(g.dtype == torch.float32 for g in ours)
    exact = torch.autograd.grad(_plain(h, w, y, None)[0], (h, w))
    for mine, other, want in zip(ours, theirs, exact, strict=True):  # bf16 matmuls: both off fp32 by as much
        assert 0 < (mine - want).abs().max() <= 1.5 * (other - want).abs().max()


class _Largest(TorchDispatchMode):
    """The largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_the_whole_logits_never_exist():
    h, w, y, _ = _inputs()
    with _Largest() as seen:
        loss, _ = linear_cross_entropy(h, w, y, chunk_elements=8 * V)
        loss.backward()
    assert seen.numel < N * V  # the largest: a chunk's logits, or the weight's gradient
    with _Largest() as plain:  # the check sees what the plain op makes
        _plain(h, w, y, None)[0].backward()
    assert plain.numel >= N * V


def test_the_models_losses_are_the_plain_cross_entropy_of_its_logits():
    model = build_model(TINY_MODEL, seed=0)
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 12))
    labels = torch.randint(0, TINY_MODEL.vocab_size, (2, 12))
    out = model(x, labels, return_logits=True)
    want = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.reshape(-1))
    torch.testing.assert_close(out.lm_loss, want, rtol=1e-6, atol=1e-6)
    assert out.mtp_loss is not None and torch.isfinite(out.mtp_loss)


class _HeadCasts(TorchDispatchMode):
    """How often the head weight is cast to another dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.ptr, self.casts = weight.data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() == self.ptr:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_under_autocast_the_head_weight_is_cast_once_for_the_lm_and_mtp_losses():
    model = build_model(TINY_MODEL, seed=0)
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 12))
    with _HeadCasts(model.lm_head.weight) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x)
    assert out.mtp_loss is not None and seen.casts == 1

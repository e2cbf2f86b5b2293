"""Host work per step that must not grow with the number of parameters: on a host-bound GPU step every
launched op costs host time, so per-parameter loops of small ops are what keep a small model at low MFU."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.optim.adamw import StoredMomentsAdamW
from moe_train.parallel.grads import clip_gradients
from moe_train.parallel.mesh import build_mesh


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _model(n: int) -> nn.Module:
    torch.manual_seed(n)
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(n)))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def test_clipping_launches_as_many_ops_for_ten_or_a_hundred_parameters():
    mesh = build_mesh(device="cpu")
    counts = []
    for n in (5, 50):
        model = _model(n)
        grads = [p.grad.clone() for p in model.parameters()]
        with _Count() as c:
            norm = clip_gradients(model, mesh, max_norm=0.5)
        counts.append(c.ops)
        want = torch.cat([g.flatten() for g in grads]).norm()
        torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
        for p, g in zip(model.parameters(), grads, strict=True):  # every gradient scaled by 0.5 / norm
            torch.testing.assert_close(p.grad, g * (0.5 / (want + 1e-6)), rtol=1e-5, atol=1e-7)
    assert counts[0] == counts[1], counts


def test_adamw_with_stored_moments_launches_as_many_ops_for_ten_or_a_hundred_parameters():
    """Its update is multi-tensor ops over the group (fp32 moments here: bf16 ones add one cast a moment)."""
    counts = []
    for n in (5, 50):
        model = _model(n)
        opt = StoredMomentsAdamW(model.parameters(), torch.float32, lr=1e-2)
        opt.step()  # the first step creates the state, one tensor a parameter
        with _Count() as c:
            opt.step()
        counts.append(c.ops)
    assert counts[0] == counts[1], counts

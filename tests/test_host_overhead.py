"""Host work per step that must not grow with the number of parameters: on a host-bound GPU step every
launched op costs host time, so per-parameter loops of small ops are what keep a small model at low MFU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.balance import BiasController
from moe_train.config import BalanceConfig
from moe_train.model.moe import MoE
from moe_train.optim.adamw import StoredMomentsAdamW
from moe_train.parallel.grads import clip_gradients
from moe_train.parallel.mesh import build_mesh
from moe_train.parallel.pipeline.graphed import _copies
from moe_train.train.totals import maxvio_record
from tiny_cfg import TINY_MODEL


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


def test_bias_update_launches_as_many_ops_for_two_or_eight_layers_and_moves_each_by_its_own_loads():
    """The aux-free bias update runs after every optimizer step, outside a captured step: one table of
    loads for every layer, not a few kernels per layer."""
    counts = []
    for n in (2, 8):
        cfg = replace(TINY_MODEL, num_hidden_layers=n, first_k_dense_replace=0)
        moes = [MoE(cfg, layer_id=i) for i in range(n)]
        gen = torch.Generator().manual_seed(n)
        loads = {m.layer_id: torch.randint(0, 9, (cfg.n_routed_experts,), generator=gen) for m in moes}
        before = [m.gate.e_score_correction_bias.clone() for m in moes]
        bias = BiasController(BalanceConfig(mode="aux_free", bias_update_rate=0.25), max_steps=10)
        with _Count() as c:
            bias.update(moes, loads, step=0, keep=torch.tensor(1.0))
        counts.append(c.ops)
        for m, b in zip(moes, before, strict=True):  # γ·sign(mean load − load), layer by layer
            load = loads[m.layer_id].float()
            want = b + 0.25 * torch.sign(load.mean() - load)
            torch.testing.assert_close(m.gate.e_score_correction_bias, want)
    assert counts[0] == counts[1], counts


def test_a_replays_outputs_are_kept_in_one_copy_per_kind():
    """After each replay the step keeps copies of the graph's outputs (losses, router counts): one
    stacked copy per dtype and shape, not one per output; the copies are values, not views of the graph's
    buffers that the next replay overwrites."""
    outs = [torch.arange(8) + i for i in range(6)] + [torch.tensor(float(i)) for i in range(3)]
    with _Count() as c:
        copies = _copies(outs)
    assert c.ops == 2 * 2, c.ops  # a stack and its unbind for each of the two kinds
    want = [o.clone() for o in outs]
    for o in outs:
        o.zero_()  # the next replay
    for got, w in zip(copies, want, strict=True):
        assert torch.equal(got, w)


def test_load_metrics_take_as_many_ops_for_two_or_eight_layers():
    """MaxVio per layer (each logged step's record) from one table of loads: the same values as the formula
    layer by layer, a layer without load at 0."""
    counts = []
    for n in (2, 8):
        gen = torch.Generator().manual_seed(n)
        loads = {i: torch.randint(0, 3, (16,), generator=gen) for i in range(n)}
        loads[0] = torch.zeros(16, dtype=torch.long)
        loads[1] = torch.tensor([1] + [0] * 15)  # mean 1/16: far below one row a expert
        with _Count() as c:
            record = maxvio_record(loads, "maxvio_batch")
        counts.append(c.ops)
        for i, load in loads.items():
            mean = load.double().mean()
            want = 0.0 if mean == 0 else float((load.double().max() - mean) / mean)
            assert record["maxvio_batch_per_layer"][str(i)] == pytest.approx(want, rel=1e-12)
        assert record["maxvio_batch"] == pytest.approx(sum(record["maxvio_batch_per_layer"].values()) / n)
    assert counts[0] == counts[1], counts

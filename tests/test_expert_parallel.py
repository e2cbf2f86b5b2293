"""Expert parallelism on gloo: dispatch/combine against the one-process MoE, bytes, empty ranks/experts."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from distributed import run_world
from moe_train.config import ModelConfig
from moe_train.model.init import init_weights
from moe_train.model.moe import MoE, MoEOptions
from moe_train.parallel.dispatch import AllToAllDispatcher, CommCounters
from moe_train.parallel.mesh import Layout, MeshError, build_mesh

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
)


def _moe_pair(cfg, rank, ep, seed=7):
    per = cfg.n_routed_experts // ep
    ref = MoE(cfg, 1)
    init_weights(ref, seed, 0.3)
    sharded = MoE(cfg, 1, MoEOptions(expert_slice=(rank * per, per)))
    init_weights(sharded, seed, 0.3)
    return ref, sharded


def _case(sizes: list[int], masked_rank: int | None, seed: int) -> dict:
    """Tokens per rank = sizes; `masked_rank`'s experts get no tokens. Asserts equality with the reference."""
    mesh = build_mesh(ep=int(os.environ["WORLD_SIZE"]))
    rank, ep = mesh.rank, mesh.layout.ep
    cfg = CFG
    ref, moe = _moe_pair(cfg, mesh.ep_rank, ep)
    per = cfg.n_routed_experts // ep
    if masked_rank is not None:
        for m in (ref, moe):
            m.gate.e_score_correction_bias[masked_rank * per : (masked_rank + 1) * per] = -10.0
    counters = CommCounters()
    moe.dispatcher = AllToAllDispatcher(mesh.group("ep"), ep, mesh.ep_rank, counters)

    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x_all = torch.randn(1, total, cfg.hidden_size, generator=g)
    up_all = torch.randn(1, total, cfg.hidden_size, generator=g)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    x_ref = x_all.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * up_all).sum().backward()

    x = x_all[:, lo:hi].clone().requires_grad_(True)
    y = moe(x)
    (y * up_all[:, lo:hi]).sum().backward()

    torch.testing.assert_close(y, y_ref[:, lo:hi].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad[:, lo:hi], rtol=1e-5, atol=1e-5)
    sl = slice(mesh.ep_rank * per, (mesh.ep_rank + 1) * per)
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(moe.experts, name).grad
        want = getattr(ref.experts, name).grad[sl]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters(), strict=True):
        if "experts." in name and "shared" not in name:
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)  # replicated weights: each rank holds its tokens' share of the gradient
        torch.testing.assert_close(grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)

    # dispatched bytes = unique (token, rank) pairs × hidden × element size
    with torch.no_grad():
        idx = moe.gate(x.detach().reshape(-1, cfg.hidden_size)).topk_idx
    pairs = sum(len(set((row // per).tolist())) for row in idx)
    got = counters.take()
    assert got.get("dispatch", 0) == pairs * cfg.hidden_size * 4, (got, pairs)
    if masked_rank is not None:
        assert moe.experts.gate_up_proj.grad.abs().sum() == 0 or mesh.ep_rank != masked_rank
    return {"pairs": pairs, "rows_in": sizes[rank]}


def _dispatch_suite() -> list[dict]:
    world = int(os.environ["WORLD_SIZE"])
    out = [_case([24] * world, None, 0)]
    out.append(_case([24] * world, world - 1, 1))  # no token for the last rank's experts
    out.append(_case([0] + [20] * (world - 1), None, 2))  # rank 0 sends nothing
    uneven = [5 + 7 * r for r in range(world)]
    out.append(_case(uneven, 0, 3))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_matches_single_process(world):
    """Outputs, input and weight gradients equal the one-process MoE (each token comes back to its place);
    dispatched bytes equal unique (token, rank) pairs; empty experts, empty ranks and uneven splits work."""
    results = run_world(world, _dispatch_suite)
    assert len(results) == world
    # 24 tokens × top-3: a token whose slots share a rank ships one row there, so pairs < 72 per rank
    assert all(r[0]["pairs"] < 24 * 3 for r in results)


def test_layout_errors_name_the_keys():
    with pytest.raises(MeshError, match=r"parallel.ep=3 must divide dp .* allowed ep: \[1, 2, 4\]"):
        Layout(world=4, pp=1, ep=3, gpus_per_node=4)
    with pytest.raises(MeshError, match="WORLD_SIZE=6 is not a multiple of parallel.pp=4"):
        Layout(world=6, pp=4, ep=1, gpus_per_node=6)


def test_layout_groups():
    lay = Layout(world=8, pp=2, ep=2, gpus_per_node=4)
    assert lay.dp == 4 and lay.edp == 2
    assert lay.ep_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.edp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.dp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dataclasses.replace(lay, gpus_per_node=2).node_of(5) == 2

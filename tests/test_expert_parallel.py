"""Expert parallelism on gloo: dispatch/combine against the one-process MoE, bytes, empty ranks/experts."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from interpreted import run_interpreted

from distributed import run_world
from host_reads import HostReads, host_copies
from moe_train.config import ModelConfig
from moe_train.model.init import init_weights
from moe_train.model.moe import MoE, MoEOptions
from moe_train.ops.fp8 import packed_row_bytes
from moe_train.ops.gather import Bags, Sources, bag_sum, gather_from, gather_rows, sum_bags_from
from moe_train.parallel.dispatch import (
    AllToAllDispatcher,
    BoundedDispatcher,
    CommCounters,
    build_dispatcher,
    build_transport,
)
from moe_train.parallel.dispatch.board import GatherBoard
from moe_train.parallel.dispatch.bounded import rows_bound
from moe_train.parallel.dispatch.direct import DirectDispatcher, slot_block
from moe_train.parallel.dispatch.symm import CollectiveTransport
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


def _case(
    sizes: list[int],
    masked_rank: int | None,
    seed: int,
    fp8: bool = False,
    bound: float | None | str = "flat",
    twin: bool = False,
    direct: bool = False,
    board: bool = False,
) -> dict:
    """Tokens per rank = sizes; `masked_rank`'s experts get no tokens. Asserts equality with the reference.

    fp8: FP8 experts in both, and FP8 dispatch rows: the experts' own 1×128 tiles of their input are those
    the dispatch sent, so the one-process FP8 MoE is matched as closely as without FP8.
    bound: "flat" for the flat dispatcher, else the bounded one with this `dispatch_bound` (its results
    must equal the flat one's bit for bit; a bound too small for the routing raises the overflow flag).
    twin: the bounded dispatcher's blocks through a transport (symm.py), its CPU twin over gloo.
    direct: the direct-placement dispatcher with this `dispatch_bound` in place of the bounded one.
    board: the direct dispatcher reading through a board (board.py), its CPU twin over gloo: the same
    placement maps, gathers and sums over peers as on CUDA symmetric memory."""
    mesh = build_mesh(ep=int(os.environ["WORLD_SIZE"]))
    rank, ep = mesh.rank, mesh.layout.ep
    cfg = dataclasses.replace(CFG, hidden_size=128, moe_intermediate_size=128) if fp8 else CFG
    ref, moe = _moe_pair(cfg, mesh.ep_rank, ep)
    per = cfg.n_routed_experts // ep
    if masked_rank is not None:
        for m in (ref, moe):
            m.gate.e_score_correction_bias[masked_rank * per : (masked_rank + 1) * per] = -10.0
    if fp8:
        ref.experts.impl = moe.experts.impl = "fp8"
    counters = CommCounters()
    if bound == "flat":
        moe.dispatcher = AllToAllDispatcher(mesh.group("ep"), ep, mesh.ep_rank, counters, fp8_rows=fp8)
    elif direct:
        moe.dispatcher = DirectDispatcher(
            mesh.group("ep"), ep, mesh.ep_rank, counters, None, None, fp8, bound,
            GatherBoard(mesh.group("ep")) if board else None,
        )  # fmt: skip
    else:
        transport = CollectiveTransport(mesh.group("ep")) if twin else None
        moe.dispatcher = BoundedDispatcher(
            mesh.group("ep"), ep, mesh.ep_rank, counters, None, None, fp8, bound, transport
        )

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
    if bound != "flat":
        over = counters.take_overflows()
        assert over is not None and int(over) == 0, "no overflow expected at this bound"
    if twin:  # dispatch and combine, forward and backward
        assert moe.dispatcher.transport.exchanges == 6, moe.dispatcher.transport.exchanges

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
        # sums of 128-wide rows in another order: fp32 rounding of larger values with fp8's widths
        atol = 1e-4 if fp8 else 1e-5
        torch.testing.assert_close(
            grad, q.grad, rtol=1e-5, atol=atol, msg=functools.partial("{}: {}".format, name)
        )

    # dispatched bytes = unique (token, rank) pairs × hidden × element size
    with torch.no_grad():
        idx = moe.gate(x.detach().reshape(-1, cfg.hidden_size)).topk_idx
    pairs = sum(len(set((row // per).tolist())) for row in idx)
    got = counters.take()
    row = packed_row_bytes(cfg.hidden_size) if fp8 else cfg.hidden_size * 4
    if bound != "flat":  # fixed blocks: the wire carries every block position, padding included
        block = rows_bound(sizes[rank], cfg.num_experts_per_tok, ep, bound)
        if direct:  # a row per slot, and each block's padding row
            block = slot_block(sizes[rank], cfg.num_experts_per_tok, per, ep, bound)
        assert got["dispatch"] == ep * block * row and got["combine"] == ep * block * cfg.hidden_size * 4
        return {"pairs": pairs, "rows_in": sizes[rank]}
    assert got.get("dispatch", 0) == pairs * row, (got, pairs)
    if fp8:  # the recipe's halving: FP8 values plus a 4-byte scale per 128 against bf16's 2 bytes a value
        assert got["dispatch"] <= 0.55 * pairs * cfg.hidden_size * 2
        # combine stays in the rows' own dtype: every dispatched row comes back as one fp32 row
        back, rest = divmod(got["combine"], cfg.hidden_size * 4)
        totals = torch.tensor([pairs, back])
        dist.all_reduce(totals)
        assert rest == 0 and totals[0] == totals[1], (got, pairs)
    if masked_rank is not None:
        assert moe.experts.gate_up_proj.grad.abs().sum() == 0 or mesh.ep_rank != masked_rank
    return {"pairs": pairs, "rows_in": sizes[rank]}


def _overflow_case(seed: int, kind: type = BoundedDispatcher) -> None:
    """A bound far below the load raises the overflow flag on the ranks that overflow (and only there)."""
    mesh = build_mesh(ep=int(os.environ["WORLD_SIZE"]))
    ep = mesh.layout.ep
    _, moe = _moe_pair(CFG, mesh.ep_rank, ep)
    per = CFG.n_routed_experts // ep
    # every token picks rank 0's experts first: rank 0 receives far more than the balanced load
    moe.gate.e_score_correction_bias[:per] = 10.0
    counters = CommCounters()
    moe.dispatcher = kind(mesh.group("ep"), ep, mesh.ep_rank, counters, None, None, False, 0.25)
    x = torch.randn(1, 24, CFG.hidden_size, generator=torch.Generator().manual_seed(seed))
    moe(x).sum().backward()
    flags = torch.tensor([int(counters.take_overflows())])
    dist.all_reduce(flags)
    assert int(flags) > 0


def _host_reads_case() -> dict[str, list[str]]:
    """The host reads of a MoE layer's forward and backward (grouped experts in bf16, CUDA's path) with
    each dispatcher: the flat one reads its split sizes, the bounded and direct ones nothing."""
    mesh = build_mesh(ep=int(os.environ["WORLD_SIZE"]))
    ep = mesh.layout.ep
    out = {}
    for kind in ("flat", "bounded", "direct", "direct_board"):
        _, moe = _moe_pair(CFG, mesh.ep_rank, ep)
        moe.to(torch.bfloat16).experts.impl = "grouped"
        # through the registry, as the trainer builds them
        name = {"flat": "alltoall", "direct_board": "direct"}.get(kind, kind)
        board = build_transport("collective", mesh, name) if kind == "direct_board" else None
        moe.dispatcher = build_dispatcher(name, mesh, CommCounters(), transport=board)
        x = torch.randn(2, 12, CFG.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        with host_copies() as host, HostReads() as r:
            moe(x).float().sum().backward()
        out[kind] = r.reads + host
    return out


def _dispatch_suite() -> list[dict]:
    world = int(os.environ["WORLD_SIZE"])
    out = [_case([24] * world, None, 0)]
    out.append(_case([24] * world, world - 1, 1))  # no token for the last rank's experts
    out.append(_case([0] + [20] * (world - 1), None, 2))  # rank 0 sends nothing
    uneven = [5 + 7 * r for r in range(world)]
    out.append(_case(uneven, 0, 3))
    out.append(_case([24] * world, None, 4, fp8=True))
    # the bounded dispatcher (equal tokens per rank, as the trainer's micro-batches): worst-case buffers,
    # a bound the load fits, an empty rank's experts, FP8 rows
    out.append(_case([24] * world, None, 0, bound=None))
    out.append(_case([24] * world, None, 0, bound=2.0))
    out.append(_case([24] * world, world - 1, 1, bound=None))
    out.append(_case([24] * world, None, 4, fp8=True, bound=None))
    out.append(_case([24] * world, None, 4, fp8=True, bound=None, twin=True))  # through a transport
    # direct placement: worst-case buffers, a bound the load fits, an empty rank's experts, FP8 rows (the
    # combine weighs: FP8 experts do not)
    out.append(_case([24] * world, None, 0, bound=None, direct=True))
    out.append(_case([24] * world, None, 0, bound=2.0, direct=True))
    out.append(_case([24] * world, world - 1, 1, bound=None, direct=True))
    out.append(_case([24] * world, None, 4, fp8=True, bound=None, direct=True))
    # the same through a board: rows read in place by their owners and senders
    out.append(_case([24] * world, None, 0, bound=None, direct=True, board=True))
    out.append(_case([24] * world, None, 0, bound=2.0, direct=True, board=True))
    out.append(_case([24] * world, world - 1, 1, bound=None, direct=True, board=True))
    out.append(_case([24] * world, None, 4, fp8=True, bound=None, direct=True, board=True))
    _overflow_case(5)
    _overflow_case(5, DirectDispatcher)
    out.append(_host_reads_case())
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 processes: slow tier
def test_dispatch_combine_matches_single_process(world):
    """Outputs, input and weight gradients equal the one-process MoE (each token comes back to its place);
    dispatched bytes equal unique (token, rank) pairs; empty experts, empty ranks and uneven splits work;
    FP8 dispatch halves the dispatched bytes and matches the one-process FP8 MoE. The bounded dispatcher
    matches too, sends whole blocks, raises its overflow flag when a bound is too small, and its MoE layer
    reads nothing on the host."""
    results = run_world(world, _dispatch_suite)
    assert len(results) == world
    # 24 tokens × top-3: a token whose slots share a rank ships one row there, so pairs < 72 per rank
    assert all(r[0]["pairs"] < 24 * 3 for r in results)
    for r in results:  # a MoE layer with the bounded or direct dispatcher reads nothing on the host
        assert r[-1]["bounded"] == r[-1]["direct"] == r[-1]["direct_board"] == [] and r[-1]["flat"], r[-1]


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


def _bags(seed: int, n_bags: int = 9) -> Bags:
    """Random bags over a random permutation of positions, some of them empty."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (n_bags,), generator=g)
    counts[3] = 0
    n = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(n_bags), counts)
    return Bags(torch.randperm(n, generator=g), F.pad(counts.cumsum(0), (1, 0)), owner)


def test_weighted_bf16_bag_sums_keep_the_weights_fp32():
    """bf16 rows weighed by fp32 weights: fp32 products summed in fp32, rounded once — the gate weights are
    not rounded to bf16 first (which moved FP8 experts' combined rows by up to a bf16 step)."""
    bags = _bags(4, n_bags=64)
    g = torch.Generator().manual_seed(4)
    n = bags.index.shape[0]
    src = torch.randn(n, 32, generator=g).to(torch.bfloat16)
    w = torch.rand(n, generator=g) * 0.9 + 0.05  # gate-like fp32 values, rarely bf16-exact
    src_bag = torch.empty_like(bags.index).index_copy_(0, bags.index, bags.owner)
    got = bag_sum(src, bags, src_bag, w)
    want = torch.zeros(bags.n_bags, 32).index_add(0, src_bag, src.float() * w.unsqueeze(1)).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_bag_sum_and_gather_rows_match_indexing_with_autograd():
    """bag_sum (weighted by each source row's own weight, and not) and gather_rows: values and gradients
    equal plain indexing and index_add (fp64, empty bags included). Row index[i] of src sits at position i,
    in bag owner[i]."""
    bags = _bags(0)
    n, hidden = bags.index.shape[0], 6
    src_bag = torch.empty_like(bags.index).index_copy_(0, bags.index, bags.owner)  # bag of each src row
    src = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, dtype=torch.float64, requires_grad=True)  # src row j's weight
    up = torch.randn(bags.n_bags, hidden, dtype=torch.float64)
    for weighted in (True, False):
        src.grad = w.grad = None
        out = bag_sum(src, bags, src_bag, w if weighted else None)
        (out * up).sum().backward()
        s2 = src.detach().clone().requires_grad_(True)
        w2 = w.detach().clone().requires_grad_(True)
        rows = (s2 * (w2 if weighted else torch.ones_like(w2)).unsqueeze(1))[bags.index]
        ref = torch.zeros(bags.n_bags, hidden, dtype=torch.float64).index_add(0, bags.owner, rows)
        (ref * up).sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(src.grad, s2.grad)
        if weighted:
            torch.testing.assert_close(w.grad, w2.grad)
        else:
            assert w.grad is None
    # gather_rows: position p copies row src_bag[p]; its backward sums each row's bag
    x = torch.randn(bags.n_bags, hidden, dtype=torch.float64, requires_grad=True)
    out = gather_rows(x, src_bag, bags)
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2[src_bag] * g_out).sum().backward()
    torch.testing.assert_close(out, x2[src_bag].detach())
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("bound", [5, 40_000, 2**31])
def test_sort_keys_is_the_stable_argsort(bound):
    """Keys sorted in a narrower integer type (int16, int32) give int64's stable order, ties included."""
    from moe_train.ops.gather import sort_keys

    key = torch.randint(0, bound + 1, (3000,), generator=torch.Generator().manual_seed(bound % 97))
    assert torch.equal(sort_keys(key, bound), torch.argsort(key, stable=True))


def test_padding_entries_add_nothing_and_get_no_gradient():
    """Bags with `pad` entries (the bounded dispatcher's fixed-length bags): a weighted bag_sum and a
    gather_rows backward equal the same bags with the padding left out, even though the padding row holds
    NaN; the padding row's weight gets zero gradient. Expert SwiGLU over a buffer with padding rows past
    the counts gives the counted rows' result and zero rows after them."""
    g = torch.Generator().manual_seed(1)
    src = torch.randn(6, 4, dtype=torch.float64, generator=g)
    src[5] = float("nan")  # the padding row: never read
    index = torch.tensor([0, 5, 2, 1, 5, 5, 3, 4])  # 4 bags of 2: bag 2 is all padding
    offsets = torch.arange(0, 9, 2)
    padded = Bags(index, offsets, torch.arange(8) // 2, pad=5)
    keep = index != 5
    plain = Bags(index[keep], F.pad(keep.view(4, 2).sum(1).cumsum(0), (1, 0)), (torch.arange(8) // 2)[keep])
    w = torch.rand(6, dtype=torch.float64, generator=g, requires_grad=True)  # row 5's: the padding's
    src_bag = torch.tensor([0, 1, 1, 3, 3, 2])
    x = src.clone().requires_grad_(True)
    out = bag_sum(x, padded, src_bag, w)
    (out * torch.arange(16.0, dtype=torch.float64).view(4, 4)).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    x2 = src.clone().requires_grad_(True)
    ref = bag_sum(x2, plain, src_bag, w2)
    (ref * torch.arange(16.0, dtype=torch.float64).view(4, 4)).sum().backward()
    torch.testing.assert_close(out, ref)
    assert not out.isnan().any() and float(out[2].detach().abs().sum()) == 0.0
    torch.testing.assert_close(w.grad[:5], w2.grad[:5])
    assert float(w.grad[5]) == 0.0
    # gather_rows: positions 0..5 copy rows, position 5 is padding: only real entries carry gradient back
    rows = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    copied = gather_rows(
        rows,
        torch.tensor([0, 1, 1, 2, 3, 0]),
        Bags(torch.tensor([0, 5, 1, 2, 5, 5, 3, 5]), offsets, torch.arange(8) // 2, pad=5),
    )
    up = torch.randn(6, 3, dtype=torch.float64, generator=g)
    (copied * up).sum().backward()
    want = torch.stack([up[0], up[1] + up[2], torch.zeros(3, dtype=torch.float64), up[3]])  # not up[5]
    torch.testing.assert_close(rows.grad, want)

    from moe_train.ops.grouped_gemm import expert_swiglu

    x = torch.randn(7, 8, generator=g)
    counts = torch.tensor([2, 0, 3])
    wgu, wd = torch.randn(3, 10, 8, generator=g), torch.randn(3, 8, 5, generator=g)
    y = expert_swiglu(x, counts, wgu, wd, "reference")
    torch.testing.assert_close(y[:5], expert_swiglu(x[:5], counts, wgu, wd, "reference"))
    assert y.shape == (7, 8) and float(y[5:].abs().sum()) == 0.0


def triton_interpreter_checks() -> None:
    """The CUDA kernels behind bag_sum against indexing references, on CPU tensors (TRITON_INTERPRET=1)."""
    from moe_train.ops import gather_triton as gt

    for seed, hidden in ((1, 70), (2, 8), (3, 1100)):
        bags = _bags(seed)
        n = bags.index.shape[0]
        g = torch.Generator().manual_seed(seed)
        src = torch.randn(n, hidden, generator=g)
        w = torch.rand(n, generator=g)
        grad = torch.randn(bags.n_bags, hidden, generator=g)
        gathered = src[bags.index]
        want = torch.zeros(bags.n_bags, hidden).index_add(0, bags.owner, gathered * w.unsqueeze(1))
        torch.testing.assert_close(gt.bag_sum(src, bags.index, bags.offsets, w), want)
        want = torch.zeros(bags.n_bags, hidden).index_add(0, bags.owner, gathered)
        torch.testing.assert_close(gt.bag_sum(src, bags.index, bags.offsets, None), want)
        torch.testing.assert_close(gt.bag_sum(src, bags.index, None, w), gathered * w.unsqueeze(1))
        want = (grad[bags.owner] * gathered).sum(1)
        torch.testing.assert_close(gt.bag_dots(grad, src, bags.index, bags.offsets), want)
        # gather_rows' forward from the source side: position index[i] copies row owner[i]
        x = torch.randn(bags.n_bags, hidden, generator=g)
        src_bag = torch.empty_like(bags.index).index_copy_(0, bags.index, bags.owner)
        torch.testing.assert_close(gt.bag_scatter(x, bags.index, bags.offsets, n), x[src_bag])
        # padding positions (`Bags.pad`): they add nothing and their dots are 0, though the row is NaN
        pad = int(bags.index[0])
        nan = src.clone()
        nan[pad] = float("nan")
        real = (bags.index != pad).float().unsqueeze(1)
        want = torch.zeros(bags.n_bags, hidden).index_add(0, bags.owner, gathered * w.unsqueeze(1) * real)
        torch.testing.assert_close(gt.bag_sum(nan, bags.index, bags.offsets, w, pad), want)
        want = (grad[bags.owner] * gathered * real).sum(1)
        torch.testing.assert_close(gt.bag_dots(grad, nan, bags.index, bags.offsets, pad), want)
        # rows read from several tensors through a table of their addresses (a board's peer buffers): equal to
        # the torch path's pass per tensor, padding positions (NaN rows) adding nothing
        srcs = [torch.randn(n, hidden, generator=g) for _ in range(3)]
        srcs[1][pad] = float("nan")
        table = torch.tensor([t.data_ptr() for t in srcs], dtype=torch.int64)
        source = torch.randint(0, 3, (n,), generator=g)
        plain = Sources(srcs)
        want = torch.stack([srcs[int(s)][int(i)] for s, i in zip(source, bags.index, strict=True)])
        got = gt.bag_sum_from(table, srcs[0], source, bags.index, None)
        torch.testing.assert_close(got, want, equal_nan=True)
        torch.testing.assert_close(gather_from(plain, source, bags.index), want, equal_nan=True)
        real_rows = torch.where(real.bool(), want, 0.0)
        want = torch.zeros(bags.n_bags, hidden).index_add(0, bags.owner, real_rows)
        padded = Bags(bags.index, bags.offsets, bags.owner, pad)
        torch.testing.assert_close(sum_bags_from(plain, source, padded), want)
        got = gt.bag_sum_from(table, srcs[0], source, bags.index, bags.offsets, pad)
        torch.testing.assert_close(got, want)
        # FP8 dispatch rows travel as packed bytes: a gather of uint8 rows is exact through the fp32 sum
        packed = [torch.randint(0, 256, (n, hidden), dtype=torch.uint8, generator=g) for _ in range(3)]
        table = torch.tensor([t.data_ptr() for t in packed], dtype=torch.int64)
        want = torch.stack([packed[int(s)][int(i)] for s, i in zip(source, bags.index, strict=True)])
        assert torch.equal(gt.bag_sum_from(table, packed[0], source, bags.index, None), want)


def test_triton_bag_kernels_match_references_in_the_interpreter():
    """bench/ep_dispatch.py checks the kernels on the GPU too."""
    run_interpreted("test_expert_parallel", "triton_interpreter_checks")


def test_bounded_buffers_enter_the_memory_estimate():
    """The estimate keeps a bounded dispatcher's slot buffer (C + 1 rows per MoE layer) in place of k rows
    per token, and adds its send and receive blocks and its transport's symmetric buffers; a bound shrinks
    them, never below the balanced load."""
    from moe_train.model.memory import mlp_bytes
    from moe_train.parallel.dispatch.bounded import bounded_memory

    k, tokens, ep = CFG.num_experts_per_tok, 64, 2
    per_rank = CFG.n_routed_experts // ep
    worst_rows, worst_blocks = bounded_memory(tokens, CFG.hidden_size, k, per_rank, ep, None, 4)
    assert worst_rows == (ep * tokens * min(k, per_rank) + 1) / tokens  # every row of every peer, all slots
    assert worst_blocks == 2 * ep * tokens * (CFG.hidden_size * 4 + 2 * k * 4)
    rows, blocks = bounded_memory(tokens, CFG.hidden_size, k, per_rank, ep, 1.5, 4)
    assert k <= rows < worst_rows and blocks <= worst_blocks
    # a symmetric-memory transport holds its buffers for the whole run: one received set of blocks (rows and
    # metadata) for peer writes, an input and an output set for NVSHMEM; FP8 rows add their packed bytes
    received = worst_blocks // 2
    for transport, copies in (("alltoall", 0), ("peer_write", 1), ("nvshmem", 2)):
        args = (tokens, CFG.hidden_size, k, per_rank, ep, None, 4, None, transport)
        assert bounded_memory(*args)[1] == worst_blocks + copies * received, transport
        packed = ep * tokens * packed_row_bytes(CFG.hidden_size)
        assert bounded_memory(*args, True)[1] == worst_blocks + copies * (received + packed), transport
    layer = 1  # a MoE layer of CFG
    assert mlp_bytes(CFG, layer, 4, "none", routed=k) == mlp_bytes(CFG, layer, 4, "none")
    assert mlp_bytes(CFG, layer, 4, "none", routed=rows) > mlp_bytes(CFG, layer, 4, "none")


def test_direct_buffers_enter_the_memory_estimate():
    """The direct dispatcher's estimate: its buffer (C + 1 rows per MoE layer, every rank's slots at worst)
    and its blocks (a row per slot with its place and gate, each way), shrunk by a bound to no less than the
    balanced load."""
    from moe_train.parallel.dispatch.direct import direct_memory

    k, tokens, ep = CFG.num_experts_per_tok, 64, 2
    per_rank = CFG.n_routed_experts // ep
    slots = tokens * min(k, per_rank)
    worst_rows, worst_blocks = direct_memory(tokens, CFG.hidden_size, k, per_rank, ep, None, 4)
    assert worst_rows == (ep * slots + 1) / tokens
    assert worst_blocks == 2 * 2 * ep * (slots + 1) * (CFG.hidden_size * 4 + 2 * 4)
    rows, blocks = direct_memory(tokens, CFG.hidden_size, k, per_rank, ep, 1.5, 4)
    assert k <= rows < worst_rows and blocks < worst_blocks
    # over a board: what a rank publishes (token rows with a zero row, expert rows and their gradients, gate
    # gradients) and its posted map, held once (symmetric memory) or gathered from every peer (collective)
    cap = ep * slots
    one = (tokens + 1) * CFG.hidden_size * 4 + (cap + 1) * (CFG.hidden_size * 8 + 4 + 12)
    args = (tokens, CFG.hidden_size, k, per_rank, ep, None, 4)
    assert direct_memory(*args, "peer_write") == (worst_rows, one)
    assert direct_memory(*args, "collective") == (worst_rows, ep * one)

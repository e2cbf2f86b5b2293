"""parallel.overlap on gloo: overlapped F&B pairs give the plain executor's losses and gradients, and inside
one F&B pair each all-to-all is in flight while the other direction computes."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from distributed import run_world
from moe_train.checkpoint import full_gradients
from moe_train.model.moe import BalanceLoss
from moe_train.model.transformer import DecoderLayer
from moe_train.parallel.expert import apply_expert_parallel, expert_slice
from moe_train.parallel.grads import reduce_gradients
from moe_train.parallel.mesh import build_mesh
from moe_train.parallel.overlap import OverlapEngine
from moe_train.parallel.pipeline.executor import PipelineExecutor
from moe_train.parallel.pipeline.schedules import Kind, build_schedule
from moe_train.parallel.pipeline.stages import rank_model_and_stages
from tiny_cfg import TINY_MODEL

# 1 dense + 4 MoE blocks: 2 MoE blocks per stage of a pp=2 DualPipeV chunk pair
CFG = replace(TINY_MODEL, num_hidden_layers=5, num_experts_per_tok=3, n_shared_experts=1)
BAL = BalanceLoss("seq", 1e-2)
SEED, MTP_W = 5, 0.3


def _batch(m: int, dp_rank: int, seq: int = 12) -> tuple[list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(100 + dp_rank)
    tokens = torch.randint(0, CFG.vocab_size, (2 * m, seq + 1), generator=g)
    return list(tokens.chunk(m)), [1.0 / m] * m


def _executor_run(
    mesh,
    name: str,
    m: int,
    overlap: bool,
    engine: OverlapEngine | None = None,
    mark_pairs: bool = False,
    probe=None,
) -> dict:
    """One step of `name` through the executor; this rank's loss share and its (unreduced) gradients.
    mark_pairs: note the start and end of each F&B pair in the engine's log; probe(model): called once the
    model is built."""
    sch = build_schedule(name, mesh.layout.pp, m, overlap)
    experts = expert_slice(CFG.n_routed_experts, mesh)
    model, stages, _ = rank_model_and_stages(CFG, sch, mesh.pp_rank, BAL, "cpu", SEED, experts)
    apply_expert_parallel(model, mesh)
    if probe is not None:
        probe(model)
    lay = mesh.layout
    peers = [lay.rank_of(q, mesh.edp_rank, mesh.ep_rank) for q in range(lay.pp)]
    ex = PipelineExecutor(sch, mesh.pp_rank, stages, peers, None, CFG.hidden_size, overlap=engine or overlap)
    if mark_pairs:
        orig = ex._pair

        def marked(action, ctx):
            ex.engine.log.append("pair begin L-")
            orig(action, ctx)
            ex.engine.log.append("pair end L-")

        ex._pair = marked
    res = ex.run(*_batch(m, mesh.dp_rank), MTP_W)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"sums": res.sums, "grads": grads, "schedule": sch}


def _compare(off: dict, on: dict, what: str) -> None:
    for k, v in off["sums"].items():
        assert on["sums"][k] == pytest.approx(v, rel=1e-5, abs=1e-8), (what, k)
    assert set(on["grads"]) == set(off["grads"]), what
    for n, g in off["grads"].items():
        torch.testing.assert_close(on["grads"][n], g, rtol=1e-5, atol=1e-7, msg=f"{what}: {n}")


def _windows(log: list[str]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(side, exchange, layer) -> (index of its issue, index of its wait) in the event log."""
    issued: dict[tuple[str, str, str], int] = {}
    out = {}
    for i, e in enumerate(log):
        side, verb, what, layer = e.split()
        if verb == "issue":
            issued[(side, what, layer)] = i
        elif verb == "wait":
            out[(side, what, layer)] = (issued.pop((side, what, layer)), i)
    assert not issued, f"exchanges never waited: {issued}"
    return out


def _check_fb_order(log: list[str]) -> dict:
    """Within one F&B pair: every exchange is issued before, and waited after, compute of the other
    direction — the one it is meant to hide under (module docstring of parallel/overlap.py)."""
    opposite = {"F": "B", "B": "F"}
    hides = {  # exchange of one side -> compute of the other side that must run while it is in flight
        ("F", "counts"): "shared",
        ("F", "dispatch"): "experts",
        ("F", "combine"): "attn",
        ("B", "combine"): "attn",
        ("B", "dispatch"): "experts",
    }
    windows = _windows(log)
    assert len(windows) >= 2 * 5, windows  # the pair covers at least one MoE block per side
    for (side, what, layer), (i, j) in windows.items():
        inside = [e.split() for e in log[i + 1 : j]]
        # a backward sub-step is logged under its ops' names joined by "+"
        other = [
            n
            for s, verb, name, _ in inside
            if s == opposite[side] and verb == "compute"
            for n in name.split("+")
        ]
        assert hides[(side, what)] in other, (side, what, layer, log[i : j + 1])
        if (side, what) == ("B", "dispatch"):  # the routed experts' weight gradients run under it too
            own = [name for s, verb, name, lay in inside if s == side and verb == "compute" and lay == layer]
            assert own == ["experts-W"], (layer, log[i : j + 1])
    return windows


def _amplified_routed(
    self, h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None
) -> torch.Tensor:
    """Another MoE block finish (`DecoderLayer.finish`): the routed experts' rows count 100 times (at
    initialisation they are small beside the residual)."""
    return h + (100 * routed + shared).view_as(h)


@contextmanager
def _patched_finish():
    """The block's finish replaced in its one place, the class, for every path that composes the block."""
    orig = DecoderLayer.finish
    DecoderLayer.finish = _amplified_routed
    try:
        yield
    finally:
        DecoderLayer.finish = orig


def _fast_suite() -> dict:
    mesh = build_mesh(ep=2)
    engine = OverlapEngine(log=[], sm_carveout=8)
    carveouts: list[tuple[int, int | None]] = []  # (exchanges in flight, SM carveout) at each experts call

    def probe(model) -> None:
        for name, mod in model.named_modules():
            if name.endswith("mlp.experts") or name.endswith("mlp.shared_experts"):
                mod.register_forward_pre_hook(
                    lambda *_: carveouts.append((engine.in_flight, torch._C._get_sm_carveout_experimental()))
                )

    off = _executor_run(mesh, "1f1b", 3, False)
    on = _executor_run(mesh, "1f1b", 3, True, engine, mark_pairs=True, probe=probe)
    with _patched_finish():
        finish = {overlap: _executor_run(mesh, "1f1b", 3, overlap)["sums"] for overlap in (False, True)}
    log = engine.log
    first = log.index("pair begin L-")
    return {
        "off": off,
        "on": on,
        "fb_log": log[first + 1 : log.index("pair end L-", first)],
        "max_in_flight": engine.max_in_flight,
        "carveouts": carveouts,
        "carveout_after": torch._C._get_sm_carveout_experimental(),
        "finish": finish,
    }


@pytest.fixture(scope="module")
def ep2_world() -> list[dict]:
    """One 2-process gloo world (ep=2) for the fast overlap tests (process starts cost seconds)."""
    return run_world(2, _fast_suite)


def test_overlap_equals_plain_and_hides_each_exchange_ep2(ep2_world):
    """ep=2 on 2 processes (pp=1): overlapped 1F1B (F(i) paired with B(i-1)) equals the plain executor, and
    inside its first F&B pair each exchange is in flight while the other direction computes."""
    results = ep2_world
    for rank, res in enumerate(results):
        _compare(res["off"], res["on"], f"rank {rank}")
        assert any(a.kind is Kind.FB for a in res["on"]["schedule"].ranks[0])
        windows = _check_fb_order(res["fb_log"])
        # four MoE blocks forward and four backward inside the pair: every one of their exchanges checked
        assert sum(side == "F" for side, _, _ in windows) == 4 * 3
        assert sum(side == "B" for side, _, _ in windows) == 4 * 2
        assert 1 <= res["max_in_flight"] <= 2  # one exchange per direction at most
        # parallel.overlap_sm_carveout: matmuls launched while an exchange is in flight leave 8 SMs free,
        # the others (a lone forward's routed experts, after its dispatch was waited) take every SM
        seen = set(res["carveouts"])
        assert {(n > 0, c) for n, c in seen} == {(True, 8), (False, None)}, seen
        assert res["carveout_after"] is None


def _trainer_pair(base: str, overrides: tuple[str, ...]) -> dict:
    """Step-0 reduced gradients and loss totals through the Trainer, overlap off and on."""
    from test_layout_invariance import make_cfg

    from moe_train.train.trainer import Trainer

    out = {}
    mesh = None
    for overlap in (False, True):
        run_dir = f"{base}/{overlap}"
        t = Trainer(make_cfg(run_dir, *overrides, f"parallel.overlap={overlap}"), run_dir, mesh=mesh)
        mesh = t.mesh
        sums, _ = t.forward_backward(0)
        reduce_gradients(t.model, t.mesh, t.ties)
        grads = full_gradients(t.model, t.mesh)  # collective: every rank calls it
        out[overlap] = {"sums": sums, "grads": grads if t.mesh.rank == 0 else {}, "redone": t.redone_steps}
        t.mesh.barrier()
    return out


def _slow_suite(base: str) -> dict:
    out = {}
    layouts = {
        "ep2": ("parallel.ep=2", "parallel.microbatches=2"),
        "pp2ep2": (
            "parallel.pp=2",
            "parallel.ep=2",
            "parallel.schedule=dualpipev",
            "parallel.microbatches=4",
        ),
        # fixed-size blocks, no host sync; its small bound overflows, and the step runs again exactly
        "bounded": ("parallel.ep=2", "parallel.dispatcher=bounded", "parallel.microbatches=2"),
        "bounded_small": (
            "parallel.ep=2",
            "parallel.dispatcher=bounded",
            "parallel.dispatch_bound=0.3",
            "parallel.microbatches=2",
        ),
        # slots placed straight in the owners' buffers, one count exchange inside the plan
        "direct": ("parallel.ep=2", "parallel.dispatcher=direct", "parallel.microbatches=2"),
        # and reading its rows in place through the board's collective twin (hops that gather and sum)
        "direct_board": (
            "parallel.ep=2",
            "parallel.dispatcher=direct",
            "parallel.dispatch_transport=collective",
            "parallel.microbatches=2",
        ),
        # a dispatcher of two hops each way (2 simulated nodes × 2 ranks): overlapped without engine code
        "hier": (
            "parallel.ep=4",
            "parallel.dispatcher=hierarchical",
            "parallel.gpus_per_node=2",
            "parallel.microbatches=2",
        ),
    }
    for key, overrides in layouts.items():
        out[key] = _trainer_pair(f"{base}/{key}", overrides)
    mesh = build_mesh(pp=1, ep=2)  # dp=4: DualPipeV's two chunks on every rank, FB pairs and split B/W
    out[("dualpipev", 4)] = (
        _executor_run(mesh, "dualpipev", 4, False),
        _executor_run(mesh, "dualpipev", 4, True),
    )
    mesh = build_mesh(pp=2, ep=2)
    for name, m in (("dualpipe", 4), ("1f1b", 3), ("interleaved1f1b", 4)):
        out[(name, m)] = (_executor_run(mesh, name, m, False), _executor_run(mesh, name, m, True))
    return out


def test_block_finish_is_written_once(ep2_world, monkeypatch):
    """The MoE block's composition is written once: overriding one phase in one place — how the routed and
    shared outputs and the residual are summed (`DecoderLayer.finish`) — changes the eager forward, an
    overlapped F&B pair (ep=2) and generation alike."""
    for res in ep2_world:
        eager, overlapped, unchanged = res["finish"][False], res["finish"][True], res["off"]["sums"]
        assert eager["loss"] != pytest.approx(unchanged["loss"], rel=1e-4)  # the override matters
        for k, v in eager.items():  # and the overlap engine runs the same finish
            assert overlapped[k] == pytest.approx(v, rel=1e-5, abs=1e-8), k

    from moe_train.infer import forward_step, generate, new_cache
    from moe_train.model import build_model

    model = build_model(CFG, BAL, "cpu", SEED).eval()
    prompt = torch.randint(0, CFG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(prompt, return_logits=True).logits
    monkeypatch.setattr(DecoderLayer, "finish", _amplified_routed)
    with torch.no_grad():
        after = model(prompt, return_logits=True).logits
        cached = forward_step(model, prompt, torch.arange(7).unsqueeze(0), new_cache(model, 1, 7), True)
        seq = prompt[0].tolist()
        for _ in range(4):  # greedy continuation by the eager forward, one token at a time
            seq.append(int(model(torch.tensor([seq]), return_logits=True).logits[0, -1].argmax()))
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(cached, after, rtol=1e-5, atol=1e-5)
    assert generate(model, [prompt[0].tolist()], max_new_tokens=4).tokens[0] == seq[7:]


@pytest.mark.slow
def test_overlap_equals_plain_4_processes(tmp_path):
    """4 processes: dp=4·ep=2 (pp=1, micro-batch i's forward paired with i−1's backward), pp=2×ep=2
    (DualPipeV), the bounded dispatcher (worst-case buffers, and a bound that overflows so that the step
    runs again exactly), the direct one (over its all-to-all twin and its board's) and the hierarchical
    dispatcher at ep=4 on 2 simulated nodes through the Trainer; through the executor DualPipeV at pp=1 (FB
    pairs and B/W split through the sub-step cuts), DualPipe, overlapped 1F1B and interleaved 1F1B (F&B
    pairs of different chunks) at pp=2×ep=2: overlap on and off give the same losses and gradients
    (rel ≤ 1e-5)."""
    results = run_world(4, _slow_suite, str(tmp_path))
    for key in ("ep2", "pp2ep2", "bounded", "bounded_small", "direct", "direct_board", "hier"):
        off, on = results[0][key][False], results[0][key][True]
        for k, v in off["sums"].items():
            assert (on["sums"][k] is None) == (v is None), (key, k)
            if v is not None:
                assert on["sums"][k] == pytest.approx(v, rel=1e-5), (key, k)
        for n, g in off["grads"].items():
            torch.testing.assert_close(on["grads"][n], g, rtol=1e-5, atol=1e-7, msg=f"{key}: {n}")
    flat = results[0]["ep2"][False]
    for key, redone in (("bounded", 0), ("bounded_small", 1)):  # the flat dispatcher's step, redone or not
        for overlap in (False, True):
            got = results[0][key][overlap]
            assert got["redone"] == redone, (key, overlap, got["redone"])
            for k, v in flat["sums"].items():
                if v is not None:
                    assert got["sums"][k] == pytest.approx(v, rel=1e-5), (key, k)
    for rank, res in enumerate(results):
        for key in (("dualpipev", 4), ("dualpipe", 4), ("1f1b", 3), ("interleaved1f1b", 4)):
            _compare(*res[key], f"rank {rank} {key}")
            assert any(a.kind is Kind.FB for acts in res[key][1]["schedule"].ranks for a in acts), key


def test_overlap_config_rules():
    from moe_train.config import ConfigError, load_config, to_object, validate
    from moe_train.parallel.layout import check_layout

    def check(*overrides: str, world: int = 2) -> None:
        cfg = to_object(load_config(["data=synthetic", *overrides]))
        validate(cfg)
        check_layout(cfg, world)

    check("parallel.ep=2", "parallel.overlap=true", "parallel.microbatches=2")
    ok = ("parallel.ep=2", "parallel.overlap=true", "parallel.microbatches=2")
    check(*ok, "parallel.overlap_sm_carveout=8")
    check(
        "parallel.ep=2",
        "parallel.overlap=true",
        "parallel.pp=2",
        "parallel.schedule=dualpipev",
        "parallel.microbatches=4",
        world=4,
    )
    # any registered dispatcher overlaps: the hierarchical one on 2 "nodes" of 2
    check(*ok, "parallel.ep=4", "parallel.dispatcher=hierarchical", "parallel.gpus_per_node=2", world=4)
    bad = {
        ("parallel.overlap=true", "parallel.microbatches=2"): "parallel.ep",
        ("parallel.ep=2", "parallel.overlap=true"): "parallel.microbatches",
        (
            "parallel.ep=2",
            "parallel.overlap=true",
            "parallel.microbatches=2",
            "trainer.recompute=full",
        ): "trainer.recompute",
        (
            "parallel.ep=2",
            "parallel.overlap=true",
            "parallel.microbatches=2",
            "parallel.overlap_sm_carveout=-1",
        ): "parallel.overlap_sm_carveout",
    }
    for overrides, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check(*overrides)


if __name__ == "__main__":  # pragma: no cover - manual debugging
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(run_world(2, _fast_suite)[0]["fb_log"])


@pytest.mark.parametrize("rows", [[3, 0, 2], [0, 0, 0]])
@pytest.mark.parametrize("recompute", [False, True])
def test_experts_b_then_w_from_taps_equals_full_backward(rows, recompute):
    """A B pass that keeps the projections' output gradients, then W from them (the split the F&B pair runs
    under the dispatch's backward), gives the input and weight gradients of one full backward — also when
    no rows arrived (every weight still gets its zero gradient) and under selective recomputation."""
    from moe_train.model.phases import Compute
    from moe_train.model.recompute import maybe_checkpoint
    from moe_train.ops.fused import swiglu_act
    from moe_train.ops.grouped_gemm import expert_swiglu_reference
    from moe_train.parallel.overlap import OverlapEngine, drain

    act = functools.partial(maybe_checkpoint, True, swiglu_act) if recompute else swiglu_act
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(rows), 6, generator=g, dtype=torch.float64)
    w_gu = torch.randn(3, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor(rows)
    out_grad = torch.randn(sum(rows), 6, generator=g, dtype=torch.float64)

    def run(split: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sub-step through the engine: a deferrable op split into B and W, or a plain op."""
        w_gu.grad = w_down.grad = None

        def experts(x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
            return expert_swiglu_reference(x, counts, w_gu, w_down, act, taps)

        def program(x: torch.Tensor):
            return (yield Compute("experts", experts, (x,), deferred_w=split))

        engine = OverlapEngine()
        x_in = x.clone().requires_grad_(True)
        tape = drain(engine.forward(program(x_in), x_in, None, 1.0))
        gx = drain(engine.backward(tape, out_grad, "B" if split else "BW"))
        if split:
            assert w_gu.grad is None and w_down.grad is None  # B computed no weight gradient
            engine.weights(tape, [w_gu, w_down])
        return gx, w_gu.grad.clone(), w_down.grad.clone()

    for full, split in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(split, full, rtol=0, atol=1e-12)

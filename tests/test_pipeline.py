"""Pipeline executor on gloo: every schedule reproduces the one-process losses and gradients."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from distributed import run_world
from moe_train.model import MoEStats, build_model
from moe_train.model.moe import BalanceLoss
from moe_train.parallel.pipeline.executor import PipelineExecutor
from moe_train.parallel.pipeline.schedules import build_schedule
from moe_train.parallel.pipeline.stages import split_layers
from tiny_cfg import TINY_MODEL

CFG = TINY_MODEL
BAL = BalanceLoss("seq", 1e-2)
SEED, MTP_W = 5, 0.3


def batch(m: int, seq: int = 12) -> tuple[list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(11 + seq)
    tokens = torch.randint(0, CFG.vocab_size, (2 * m, seq + 1), generator=g)
    micro = list(tokens.chunk(m))
    return micro, [t.shape[0] / tokens.shape[0] for t in micro]


def reference(m: int, seq: int = 12) -> tuple[float, dict[str, torch.Tensor]]:
    model = build_model(CFG, BAL, seed=SEED)
    micro, weights = batch(m, seq)
    total = 0.0
    for t, w in zip(micro, weights, strict=True):
        stats = MoEStats()
        out = model(t[:, :-1], t[:, 1:], stats)
        loss = (out.lm_loss + MTP_W * out.mtp_loss + stats.balance_loss()) * w
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _run(name: str, m: int, check_deferred_w: bool, seq: int = 12) -> dict:
    rank, world = dist.get_rank() if dist.is_initialized() else 0, int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    sch = build_schedule(name, world, m)
    chunks = split_layers(CFG.num_hidden_layers, sch.n_chunks)
    last = len(chunks) - 1

    def stage(c: int):  # every stage its own module, DualPipe's two copies on one rank included
        return build_model(CFG, BAL, "cpu", SEED, layer_ids=chunks[c], first=c == 0, last=c == last)

    stages = {s: stage(sch.chunks[s]) for s in sch.stages_of(rank)}
    ex = PipelineExecutor(sch, rank, stages, list(range(world)), None, CFG.hidden_size)
    if seq != 12:  # a step of another sequence length first: shapes are derived per step, not fixed
        ex.run(*batch(m, 12), MTP_W)
        for mod in stages.values():
            mod.zero_grad(set_to_none=True)
    micro, weights = batch(m, seq)
    if check_deferred_w:
        _check_b_then_w(ex, sch, micro, weights)
        for mod in stages.values():
            mod.zero_grad(set_to_none=True)
    res = ex.run(micro, weights, MTP_W)
    grads: dict[str, torch.Tensor] = {}
    for mod in stages.values():
        for n, p in mod.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[n] = grads[n] + g if n in grads else g.clone()
    dist.barrier()
    return {"loss": res.sums["loss"], "grads": grads}


def _check_b_then_w(ex, sch, micro, weights) -> None:
    """Deferred W is real: a B leaves the weights' .grad untouched; its W changes them."""
    seen = []

    def snapshot(stage):
        return [None if p.grad is None else p.grad.clone() for p in ex.stages[stage].parameters()]

    def same(a, b):
        return all(
            (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
            for x, y in zip(a, b, strict=True)
        )

    def watch(part, ctx, orig=ex._run_part):
        before = snapshot(part.stage) if part.kind.value in ("B", "W") else None
        orig(part, ctx)
        if part.kind.value == "B":
            seen.append(same(before, snapshot(part.stage)))
        elif part.kind.value == "W":
            assert not same(before, snapshot(part.stage)), f"W {part} filled no gradient"

    ex._run_part = watch
    ex.run(micro, weights, MTP_W)
    del ex._run_part
    if any(a.kind.value == "B" for a in sch.ranks[ex.rank]):
        assert seen and all(seen), seen


def _suite(cases: list[tuple[str, int, bool]]) -> list[dict]:
    return [_run(*c) for c in cases]


def _merge(per_rank: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    loss = sum(r["loss"] for r in per_rank)
    grads: dict[str, torch.Tensor] = {}
    for r in per_rank:
        for n, g in r["grads"].items():  # tied embedding copies and DualPipe's mirrored stages add up
            grads[n] = grads[n] + g if n in grads else g
    return loss, grads


def _assert_matches(cases, results, world):
    for i, (name, m, *rest) in enumerate(cases):
        loss, grads = _merge([results[r][i] for r in range(world)])
        ref_loss, ref_grads = reference(m, *rest[1:])
        assert loss == pytest.approx(ref_loss, rel=1e-5), (name, m)
        assert set(grads) == set(ref_grads), (name, sorted(set(ref_grads) ^ set(grads))[:5])
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=f"{name} pp={world} m={m}: {n}")


def test_schedules_on_2_ranks():
    cases = [
        ("1f1b", 1, False),
        ("1f1b", 3, False, 7),  # after a step of length 12: shapes are derived per step
        ("dualpipev", 4, True),
        ("dualpipev", 5, False),
        ("dualpipe", 4, True),
        ("dualpipe", 6, False, 9),
        ("interleaved1f1b", 4, False),  # two chunks per rank, in groups of pp micro-batches
    ]
    results = run_world(2, _suite, cases)
    _assert_matches(cases, results, 2)


@pytest.mark.slow  # the fast tier keeps the 2-rank schedules test
def test_dualpipev_on_one_rank():
    """pp=1 DualPipeV: both chunks of the V on one rank, handed over locally."""
    cases = [("dualpipev", 2, True), ("dualpipev", 3, False)]
    results = run_world(1, _suite, cases)
    _assert_matches(cases, results, 1)


@pytest.mark.slow
def test_schedules_on_4_ranks():
    cases = [("1f1b", 4, False), ("1f1b", 7, False), ("dualpipev", 8, True), ("dualpipe", 8, True)]
    results = run_world(4, _suite, cases)
    _assert_matches(cases, results, 4)

"""Activation recomputation changes memory, never the numbers: losses, gradients and router counts of
trainer.recompute=selective|full equal those of none, in one process and through a 2-rank pipeline."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_trainer import make_cfg

from distributed import run_world
from moe_train.model.recompute import in_backward
from moe_train.train.trainer import Trainer

MODES = ("none", "selective", "full")


def _run_mode(run_dir: str, mode: str, *overrides: str) -> dict:
    """Step-0 gradients, MoE forward calls of that step, and the records of two optimizer steps."""
    t = Trainer(make_cfg(run_dir, "trainer.max_steps=2", f"trainer.recompute={mode}", *overrides), run_dir)
    calls = [0]
    hooks = [
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for m in t.model.moe_layers()
    ]
    sums, stats = t.forward_backward(0)
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.engine.optimizer.zero_grad(set_to_none=True)
    records = [t.train_step(s) for s in range(2)]
    return {
        "sums": sums,
        "grads": grads,
        "records": records,
        "calls": calls[0],
        "n_records": len(stats.records),
    }


def test_modes_give_identical_losses_gradients_and_router_counts(tmp_path):
    runs = {m: _run_mode(str(tmp_path / m), m) for m in MODES}
    ref = runs["none"]
    assert ref["grads"] and ref["sums"]["balance_loss"] is not None  # the balance term is exercised
    for mode in ("selective", "full"):
        got = runs[mode]
        assert got["sums"] == ref["sums"], mode
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-6, atol=0, msg=f"{mode} {name}")
        assert got["n_records"] == ref["n_records"], mode  # no record from a recomputed forward
        for a, b in zip(ref["records"], got["records"], strict=True):
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], mode
            assert a["expert_load"] == b["expert_load"], mode  # counts not doubled
    # full really re-enters each MoE forward inside backward (so the checks above are not vacuous); the
    # recomputation may stop early, once the last tensor saved for backward is recomputed
    assert runs["full"]["calls"] == 2 * ref["calls"]


def test_in_backward_is_false_outside_autograd():
    assert not in_backward()
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(in_backward()) or g)
    y.sum().backward()
    assert seen == [True]


def test_memory_estimate_line_and_run_info(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    t = Trainer(make_cfg(run_dir, "trainer.max_steps=1", "trainer.recompute=selective"), run_dir)
    out = capsys.readouterr().out
    params = sum(p.numel() for p in t.model.parameters())
    line = next(ln for ln in out.splitlines() if ln.startswith("rank 0: params"))
    assert f"params {params:,} (" in line and "activations ~" in line and "total ~" in line
    assert t.memory.params == params and t.memory.state_bytes == 16 * params  # fp32 on CPU
    assert t.memory.in_flight == 1
    with open(os.path.join(run_dir, "run_info.json")) as f:
        info = json.load(f)
    assert info["memory_estimate_rank0"]["params"] == params
    assert info["recompute"] == "selective"
    # recomputation lowers the activation estimate, never the state
    acts = {}
    for mode in MODES:
        d = str(tmp_path / mode)
        acts[mode] = Trainer(make_cfg(d, "trainer.max_steps=1", f"trainer.recompute={mode}"), d).memory
    assert acts["full"].activation_bytes < acts["selective"].activation_bytes < acts["none"].activation_bytes
    assert len({m.state_bytes for m in acts.values()}) == 1


def _distributed_worker(base: str, layouts: list[tuple[str, ...]]) -> list[dict]:
    """Each layout with recompute none and full, one mesh per layout (its first Trainer builds it)."""
    out = []
    for i, layout in enumerate(layouts):
        got, mesh = {}, None
        for mode in ("none", "full"):
            run_dir = f"{base}/{i}/{mode}"
            cfg = make_cfg(run_dir, "trainer.max_steps=2", f"trainer.recompute={mode}", *layout)
            t = Trainer(cfg, run_dir, mesh=mesh)
            mesh = t.mesh
            got[mode] = {
                "records": [t.train_step(s) for s in range(2)],
                "params": sum(p.numel() for p in t.model.parameters()),
                "memory": t.memory,
            }
        out.append(got)
    return out


@pytest.mark.slow
def test_full_recompute_through_pipeline_and_expert_parallel_on_2_ranks(tmp_path):
    layouts = [
        ("parallel.pp=2", "parallel.schedule=dualpipev", "parallel.microbatches=4"),
        ("parallel.ep=2",),
    ]
    per_rank = run_world(2, _distributed_worker, str(tmp_path), layouts)
    for results in per_rank:
        for layout, got in zip(layouts, results, strict=True):
            for a, b in zip(got["none"]["records"], got["full"]["records"], strict=True):
                assert a["loss"] == b["loss"], layout
                assert a["expert_load"] == b["expert_load"], layout
                assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"], layout
            assert got["full"]["memory"].params == got["full"]["params"]  # this rank's partial model
    # DualPipeV keeps several micro-batches in flight on each rank; no pipeline keeps one
    assert all(r[0]["full"]["memory"].in_flight > 1 for r in per_rank)
    assert all(r[1]["full"]["memory"].in_flight == 1 for r in per_rank)

"""Gradient all-reduce overlapped with backward (parallel.overlap_grad_reduce): same sums, issued earlier.

Layout-invariance tests already run every dp/ep layout through it (it is on by default); this checks that it
really starts reductions inside backward, and that the sums equal the after-backward reduction bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_world
from moe_train.parallel.grads import reduce_gradients
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg


def _case(base: str, layout: tuple[str, ...]) -> dict:
    common = ("trainer.resume=none", "parallel.microbatches=2", *layout)
    on = Trainer(tiny_cfg(f"{base}/on", *common, steps=1), base)
    assert on.engine.grad_sync is not None
    on.engine.grad_sync.arm()
    on.forward_backward(0)
    launched_in_backward = sum(b.launched for b in on.engine.grad_sync.buckets)
    on.engine.grad_sync.finish()
    off_cfg = tiny_cfg(f"{base}/off", *common, "parallel.overlap_grad_reduce=false", steps=1)
    off = Trainer(off_cfg, base, mesh=on.mesh)
    assert off.engine.grad_sync is None
    off.forward_backward(0)
    reduce_gradients(off.model, off.mesh, off.ties)
    g_off = dict(off.model.named_parameters())
    same = all(torch.equal(p.grad, g_off[n].grad) for n, p in on.model.named_parameters())
    return {"buckets": len(on.engine.grad_sync.buckets), "launched": launched_in_backward, "same": same}


def _world(base: str) -> list[dict]:
    return [_case(f"{base}/dp", ()), _case(f"{base}/ep", ("parallel.ep=2",))]


@pytest.mark.slow  # 2 processes, 2 runs: the fast tier's layout tests reduce gradients over dp too
def test_reductions_start_inside_backward_and_sum_the_same(tmp_path):
    for rank_results in run_world(2, _world, str(tmp_path)):
        for r in rank_results:
            assert r["same"], r
            assert r["buckets"] >= 1 and r["launched"] == r["buckets"], r  # all launched before finish()

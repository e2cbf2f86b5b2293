"""Steps that read nothing back (`Trainer.defers_reads`): the skip of a non-finite step is a device flag the
fused AdamW and the bias update take, and the records are read and judged later (`Trainer.settle`), in one
transfer. The tests hold that path to the one that reads every step, bit for bit, skips and stops
included; CPU runs it with torch's fused AdamW, the optimizer CUDA gets by default."""

from __future__ import annotations

import json
import math

import pytest
import torch

from host_reads import HostReads, host_copies
from moe_train.model.moe import RoutedExperts
from moe_train.train.faults import NonFiniteLossError
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg

STEPS, BAD = 5, 2  # step index 2 (step 3 in the log) gets a non-finite loss


def _trainer(run_dir, deferred: bool, *overrides: str) -> Trainer:
    cfg = tiny_cfg(str(run_dir), "trainer.resume=none", "parallel.microbatches=2", *overrides, steps=STEPS)
    t = Trainer(cfg, str(run_dir))
    groups = [{**g, "fused": True, "foreach": None} for g in t.engine.optimizer.param_groups]
    t.engine.optimizer = torch.optim.AdamW(groups, fused=True)
    assert t.engine.skips_on_device
    t.defers_reads = deferred
    fb = t.forward_backward

    def poisoned(step: int):  # noqa: ANN202 - one bad batch: its loss is non-finite, its gradients not
        sums, stats = fb(step)
        if step == BAD:
            sums["loss"] = sums["loss"] * float("nan")
        return sums, stats

    t.forward_backward = poisoned
    return t


def _steps(t: Trainer) -> list[dict]:
    records = [t.train_step(s) for s in range(STEPS)]
    t.settle()
    return records


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("dtype", ["fp32", "bf16_master"])
def test_deferred_reads_equal_reading_every_step_bit_for_bit_with_a_skipped_step(tmp_path, dtype):
    runs = {}
    for deferred in (False, True):
        t = _trainer(
            tmp_path / str(deferred), deferred, f"trainer.dtype={dtype}", "trainer.skip_nonfinite=true"
        )
        runs[deferred] = (t, _steps(t))
    (eager, want), (lazy, got) = runs[False], runs[True]
    assert want[BAD]["skipped_steps"] == 1 and math.isnan(want[BAD]["grad_norm"])
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        assert all(_same(a[k], b[k]) for k in a), {k: (a[k], b[k]) for k in a if not _same(a[k], b[k])}
    assert lazy.skipped_steps == eager.skipped_steps == 1
    for (name, p), q in zip(eager.model.state_dict().items(), lazy.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name  # weights and selection biases: the skipped step changed neither


def test_a_deferred_non_finite_step_stops_the_run_when_it_is_read(tmp_path):
    t = _trainer(tmp_path, True)  # trainer.skip_nonfinite=false
    for s in range(STEPS):
        t.train_step(s)  # nothing is judged yet
    with pytest.raises(NonFiniteLossError, match=f"non-finite loss nan at step {BAD + 1} "):
        t.settle()


def test_a_one_process_step_reads_nothing_back(tmp_path):
    """The whole step — forward, loss, backward, clipping, update, bias update — issues no host read when
    its routed experts run as grouped GEMMs (CUDA's path, here on the CPU: `torch._grouped_mm` with bf16
    weights): no scalar read, no tolist or host copy. This is what lets the host run ahead of the GPU and
    a CUDA graph capture the micro-batch."""
    t = _trainer(tmp_path, True, "trainer.dtype=bf16_master", "trainer.skip_nonfinite=true")
    for m in t.model.modules():
        if isinstance(m, RoutedExperts):
            m.impl = "grouped"
    with host_copies() as host, HostReads() as r:
        record = t.train_step(0)
    assert (r.reads, host) == ([], [])
    t.settle()
    assert isinstance(record["loss"], float) and isinstance(record["grad_norm"], float)


def test_a_run_with_deferred_reads_logs_saves_and_evaluates_what_the_reading_run_does(tmp_path):
    """`Trainer.run`: records settled only at log, save and evaluation steps (log_every=3 leaves steps
    unread across those points) give the same metrics.jsonl, summary and checkpoint as reading every step."""
    every = (
        "trainer.log_every=3",
        "trainer.eval_every=4",
        "trainer.ckpt_every=5",
        "trainer.skip_nonfinite=true",
    )
    logs, weights = {}, {}
    for deferred in (False, True):
        run = tmp_path / str(deferred)
        t = _trainer(run, deferred, *every)
        t.run()
        timing = ("tokens_per_s", "mfu", "peak_mem_gib", "run_dir")
        with open(run / "metrics.jsonl") as f:
            logs[deferred] = [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]
        weights[deferred] = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert [r["step"] for r in logs[True] if r["kind"] == "train"] == [1, 3, 5]
    assert logs[True][-1]["skipped_steps"] == 1  # the poisoned step, judged at a later settle
    for a, b in zip(logs[False], logs[True], strict=True):
        assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a), (a, b)
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])

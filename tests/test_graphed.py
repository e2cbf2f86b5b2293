"""Micro-batches replayed from CUDA graphs (parallel/pipeline/graphed.py): the graphed path's protocol —
static token and document buffers, device-scalar loss weights, gradients accumulated in place — runs on the
CPU without a capture, and a step through it equals the eager step bit for bit."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from grouped_fp8_twin import grouped_fp8_twin  # noqa: F401 - a fixture
from ragged_twin import ragged_twin  # noqa: F401 - a fixture

from moe_train.config import ConfigError
from moe_train.model.memory import MemoryEstimate
from moe_train.ops.cudnn_attention import RaggedDocs
from moe_train.parallel.pipeline import one_f_one_b
from moe_train.parallel.pipeline.graphed import GraphedMicroBatch, one_stage_order
from moe_train.parallel.pipeline.schedules import interleaved_1f1b
from moe_train.train import setup
from moe_train.train.setup import graph_blocker, use_graphs
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg

STEPS = 6
BASE = (
    "trainer.resume=none",
    "parallel.microbatches=2",
    "trainer.mtp_weight_switch_frac=0.5",  # the MTP weight changes between replays (a device scalar)
    "data.synthetic_doc_tokens=12",  # every micro-batch holds documents: masks and restarted positions
)


def _run(run_dir, graphed: bool, *overrides: str, deferred: bool = False) -> tuple[Trainer, list[dict]]:
    """deferred: fused AdamW (CUDA's default optimizer) and steps that read nothing back, as on one GPU."""
    t = Trainer(tiny_cfg(str(run_dir), *BASE, *overrides, steps=STEPS), str(run_dir))
    if deferred:
        groups = [{**g, "fused": True, "foreach": None} for g in t.engine.optimizer.param_groups]
        t.engine.optimizer, t.defers_reads = torch.optim.AdamW(groups, fused=True), True
    if graphed:
        use_graphs(t.executor, t.engine, capture=False)
    records = [t.train_step(s) for s in range(STEPS)]
    t.settle()
    return t, records


def _graphed_equals_eager(tmp_path, *overrides: str, deferred: bool) -> None:
    eager, want = _run(tmp_path / "eager", False, *overrides, deferred=deferred)
    graphed, got = _run(tmp_path / "graphed", True, *overrides, deferred=deferred)
    g = graphed.executor.graphed
    assert isinstance(g, GraphedMicroBatch) and g.captured  # micro-batches after the warm-up replayed
    keys = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "expert_load")
    for a, b in zip(want, got, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    ref = dict(eager.model.named_parameters())
    for name, p in graphed.model.named_parameters():
        assert torch.equal(p, ref[name]), name
    buffers = dict(eager.model.named_buffers())  # the selection biases moved the same way
    for name, b in graphed.model.named_buffers():
        assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("dtype, deferred", [("fp32", False), ("bf16_master", False), ("bf16_master", True)])
def test_graphed_micro_batches_equal_the_eager_step_bit_for_bit(tmp_path, dtype, deferred):
    """deferred: both runs as one GPU runs them, the graphs' outputs read back at `settle`."""
    _graphed_equals_eager(tmp_path, f"trainer.dtype={dtype}", deferred=deferred)


FP8 = ("trainer.dtype=fp8", "model.hidden_size=128", "model.moe_intermediate_size=128")  # experts in FP8


@pytest.mark.usefixtures("grouped_fp8_twin")
def test_graphed_fp8_micro_batches_equal_the_eager_step_bit_for_bit(tmp_path):
    """FP8 steps whose experts run the grouped kernels (here their twin: nothing read on the host) through
    the graphed path, as on one FP8 GPU."""
    _graphed_equals_eager(tmp_path, *FP8, deferred=True)


def test_fp8_steps_are_graphed_only_where_their_experts_read_nothing_on_the_host(tmp_path, monkeypatch):
    """On a GPU without the grouped kernels the FP8 experts read their counts on the host: no graphs there,
    with the reason; with them, nothing blocks an FP8 step."""
    t = Trainer(tiny_cfg(str(tmp_path), *BASE, *FP8, steps=2), str(tmp_path))
    gpu = SimpleNamespace(device=torch.device("cuda"), world=1)
    monkeypatch.setattr(setup, "fp8_experts_on_device", lambda device: False)
    assert "fp8 reads each MoE layer's row counts on the host" in graph_blocker(t.cfg, gpu, t.executor)
    monkeypatch.setattr(setup, "fp8_experts_on_device", lambda device: True)
    assert graph_blocker(t.cfg, gpu, t.executor) is None


def test_graphed_micro_batches_of_both_kinds_with_plain_rows_and_documents(tmp_path):
    """Rows without documents and rows with them are graphs of their own (different control flow)."""
    eager, want = _run(tmp_path / "eager", False, "data.synthetic_doc_tokens=0")
    graphed, got = _run(tmp_path / "graphed", True, "data.synthetic_doc_tokens=0")
    assert [r["loss"] for r in want] == [r["loss"] for r in got]
    assert {k[1] for k in graphed.executor.graphed.captured} == {"causal"}


@pytest.mark.usefixtures("ragged_twin")
def test_graphed_micro_batches_with_cudnn_ragged_entries(tmp_path):
    """Document masks through cuDNN's ragged entries (the kernel's CPU twin): a graph per entries' capacity,
    each replay's entries recomputed from its ids, equal to the eager step bit for bit. Micro-batches of
    more documents than a graph's capacity would index past its entries."""
    eager, want = _run(tmp_path / "eager", False, "data.synthetic_doc_tokens=10")
    graphed, got = _run(tmp_path / "graphed", True, "data.synthetic_doc_tokens=10")
    assert [r["loss"] for r in want] == [r["loss"] for r in got]
    captured = graphed.executor.graphed.captured
    assert len({key[-1] for key in captured}) >= 2, captured.keys()  # capacities: several graphs
    for key, c in captured.items():
        assert isinstance(c.run.docs[0].mask(torch.float32), RaggedDocs) and key[-1] == c.run.docs[0].capacity
    ref = dict(eager.model.named_parameters())
    for name, p in graphed.model.named_parameters():
        assert torch.equal(p, ref[name]), name


def test_a_gradient_buffer_freed_between_steps_is_what_keep_grads_prevents(tmp_path):
    """The graphs accumulate into the gradient buffers they were recorded with, so the engine must zero them
    in place: with graphs on, gradients exist (zeros) between steps instead of being freed."""
    t, _ = _run(tmp_path / "g", True, "trainer.dtype=bf16_master")
    masters = [m for _, m in t.engine.masters.named]
    assert all(m.grad is not None and not m.grad.any() for m in masters)


def test_cuda_graph_true_where_a_step_cannot_be_captured_is_a_config_error(tmp_path):
    cfg = tiny_cfg(str(tmp_path), *BASE, "trainer.cuda_graph=true", steps=2)
    with pytest.raises(ConfigError, match="cuda_graph=true is not possible here: it needs a CUDA device"):
        Trainer(cfg, str(tmp_path))
    auto = tmp_path / "auto"
    t = Trainer(tiny_cfg(str(auto), *BASE, "trainer.cuda_graph=null", steps=2), str(auto))
    assert not t.cuda_graph and t.executor.graphed is None  # null: graphs only where a step qualifies
    assert graph_blocker(t.cfg, t.mesh, t.executor) == "it needs a CUDA device"


def test_the_memory_estimate_counts_graph_held_activations_under_evaluation():
    """A graph keeps its micro-batch's activation memory between replays, so evaluation comes on top: the
    one part of the estimate graphs change, and what `trainer.cuda_graph=null` checks before using them."""
    eager = MemoryEstimate(10, 100, 50, 1, "none", 20)
    graphed = replace(eager, graphs_hold_activations=True)
    assert (eager.eval_total_bytes, graphed.eval_total_bytes) == (120, 170)
    assert eager.total_bytes == graphed.total_bytes  # a training step needs the same either way
    assert eager.warnings(150) == []
    (line,) = graphed.warnings(150)
    assert line.startswith("warning: evaluation needs") and "trainer.cuda_graph=false" in line


def test_only_a_one_stage_forward_then_backward_order_is_graphed():
    assert one_stage_order(one_f_one_b(1, 3), 0)
    assert not one_stage_order(one_f_one_b(2, 3), 0)  # two stages: activations cross ranks
    assert not one_stage_order(one_f_one_b(1, 3, overlap=True), 0)  # FB pairs interleave two micro-batches
    assert not one_stage_order(interleaved_1f1b(1, 2, virtual_stages=2), 0)  # two chunks on one rank

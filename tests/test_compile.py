"""`trainer.compile=phases` (model/compile.py): the trainer with every block's phases compiled gives the
eager trainer's losses and gradient norms, under the same parameter names (inductor's CPU backend)."""

from __future__ import annotations

import json

import pytest
import torch

from moe_train.model.compile import compile_mode, compile_phases
from moe_train.model.moe import MoE
from moe_train.train.trainer import Trainer
from tiny_cfg import tiny_cfg


@pytest.mark.slow  # inductor compiles each phase on the CPU: about a minute
@pytest.mark.parametrize("recompute", ["none", "full"])  # compiled phases inside recomputed blocks too
def test_compiled_phases_train_like_the_eager_ones(tmp_path, recompute):
    runs = {}
    for mode in ("none", "phases"):
        run = tmp_path / mode
        overrides = (
            "trainer.resume=none",
            "model.num_nextn_predict_layers=0",
            f"trainer.compile={mode}",
            f"trainer.recompute={recompute}",
        )
        t = Trainer(tiny_cfg(str(run), *overrides, steps=2), str(run))
        runs[mode] = (t, [t.train_step(s) for s in range(2)])
    (eager, want), (compiled, got) = runs["none"], runs["phases"]
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)
    assert dict(compiled.model.named_parameters()).keys() == dict(eager.model.named_parameters()).keys()
    moe = next(m for m in compiled.model.modules() if isinstance(m, MoE))
    assert moe.experts._compiled_call_impl is not None  # nn.Module.compile ran: the compiled call was used
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_compile_phases_counts_every_phase_callable():
    from moe_train.model import build_model
    from tiny_cfg import TINY_MODEL

    model = build_model(TINY_MODEL, device="meta")
    blocks = [m for m in model.modules() if m.__class__.__name__ == "DecoderLayer"]
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    shared = sum(m.shared_experts is not None for m in moes)
    assert compile_phases(model) == 3 * len(blocks) + 2 * len(moes) + shared


def test_compile_auto_is_phases_on_cuda_and_none_on_cpu(tmp_path):
    """The default (`trainer.compile=auto`) compiles each block's phases where a step is replayed from a
    CUDA graph, and leaves CPU runs (tests, short jobs) and FP8 training uncompiled; run_info.json records
    what ran."""
    assert compile_mode("auto", torch.device("cuda")) == "phases"
    assert compile_mode("auto", torch.device("cpu")) == "none"
    assert compile_mode("phases", torch.device("cpu")) == "phases"
    assert compile_mode("none", torch.device("cuda")) == "none"
    assert compile_mode("auto", torch.device("cuda"), fp8=True) == "none"  # not yet run compiled on a GPU
    assert compile_mode("phases", torch.device("cuda"), fp8=True) == "phases"
    cfg = tiny_cfg(str(tmp_path), "trainer.resume=none", steps=1)
    assert cfg.trainer.compile == "auto"
    Trainer(cfg, str(tmp_path)).run()
    with open(tmp_path / "run_info.json", encoding="utf-8") as f:
        assert json.load(f)["compile"] == "none"

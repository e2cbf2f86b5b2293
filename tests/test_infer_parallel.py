"""Tensor-parallel inference (parallel/tensor.py) on 2 gloo processes against one process: the same greedy
tokens and the same logits (fp32, rel ≤ 1e-5), through the absorbed and the plain attention paths, with and
without a query latent, for tp=2, ep=2 and tp=2 × ep=2; and the command line over torchrun-style ranks."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from test_infer import BASE, CASES, ids, rel_err, set_biases, tiny

from distributed import run_world
from moe_train.checkpoint import save_checkpoint
from moe_train.config import ModelConfig, TrainConfig
from moe_train.generate import main as generate_main
from moe_train.infer import generate, new_cache
from moe_train.infer.forward import InferenceModel
from moe_train.model import build_model
from moe_train.parallel.tensor import parallelize_for_decode

PROMPTS = [[5, 9, 2, 7, 1], [3, 4]]


def _outputs(layouts: list[int | None]) -> dict:
    """Per layout (None: one process; else the ep of a tp × ep split of the world) and case: greedy tokens
    (absorbed and plain decode), the logits of a prefill and of one decode step, the parameters held."""
    if layouts != [None]:
        dist.init_process_group("gloo")
    out = {}
    for ep in layouts:
        for case in sorted(CASES):
            model = InferenceModel(tiny(case))
            if ep is not None:
                model = parallelize_for_decode(model, ep)
            tokens = {absorb: generate(model, PROMPTS, 6, absorb=absorb).tokens for absorb in (True, False)}
            x = ids((2, 7), seed=1)
            cache = new_cache(model, 2, 8)
            prefill = model(x, torch.arange(7).expand(2, 7), cache, absorb=False)
            cache.lengths.fill_(7)
            step = model(x[:, -1:], torch.full((2, 1), 7), cache, absorb=True)
            held = sum(p.numel() for p in model.parameters())
            out[ep, case] = {"tokens": tokens, "prefill": prefill, "step": step, "params": held}
    return out


def _check(ref: dict, ranks: list[dict], ep: int) -> None:
    for case in CASES:
        want = ref[None, case]
        for r, got in enumerate(ranks):
            g = got[ep, case]
            assert g["tokens"] == want["tokens"], (ep, case, r)
            assert rel_err(g["prefill"], want["prefill"]) <= 1e-5, (ep, case, r)
            assert rel_err(g["step"], want["step"]) <= 1e-5, (ep, case, r)
            assert g["params"] < want["params"], (ep, case, r)  # each rank holds a slice


def test_tp2_and_ep2_generation_equals_one_process():
    ref = _outputs([None])
    ranks = run_world(2, _outputs, [1, 2])  # tp=2, then ep=2
    _check(ref, ranks, 1)
    _check(ref, ranks, 2)


@pytest.mark.slow  # 4 processes
def test_tp2_by_ep2_generation_equals_one_process():
    _check(_outputs([None]), run_world(4, _outputs, [2]), 2)


def _cli(run_dir: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    argv = [run_dir, "--prompt", "héllo", "--max-new-tokens", "6", "--no-eod-stop", "--ep", "2"]
    result = generate_main(argv, out, err)
    return {"tokens": result.tokens, "out": out.getvalue(), "err": err.getvalue()}


def test_the_command_line_splits_over_torchrun_ranks_and_rank_0_prints(tmp_path):
    cfg = ModelConfig(**{**BASE, **CASES["lora_q"], "vocab_size": 257})
    model = build_model(cfg, seed=3).eval()
    set_biases(model)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(TrainConfig(model=cfg)))
    save_checkpoint(str(tmp_path / "checkpoints"), 5, model.state_dict(), None, {"step": 5}, yaml)
    one = generate_main([str(tmp_path), "--prompt", "héllo", "--max-new-tokens", "6", "--no-eod-stop"])
    r0, r1 = run_world(2, _cli, str(tmp_path))
    assert r0["tokens"] == r1["tokens"] == one.tokens
    assert r0["out"].startswith("héllo") and r1["out"] == ""
    assert "over 2 ranks (tp=1, ep=2)" in r0["err"]
    with pytest.raises(SystemExit, match=r"--tp=2 --ep=1 needs 2 processes: launch with torchrun"):
        generate_main([str(tmp_path), "--prompt", "a", "--tp", "2"])

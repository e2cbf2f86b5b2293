"""Tensor-parallel inference (parallel/tensor.py) on 2 gloo processes against one process: the same greedy
tokens and the same logits (fp32, rel ≤ 1e-5), through the absorbed and the plain attention paths, with and
without a query latent, for tp=2, ep=2 and tp=2 × ep=2; and the command line over torchrun-style ranks."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from test_infer import BASE, CASES, byte_model_checkpoint, ids, rel_err, tiny
from torch.profiler import ProfilerActivity, profile

from distributed import run_world
from moe_train.checkpoint import save_checkpoint
from moe_train.config import TrainConfig
from moe_train.generate import main as generate_main
from moe_train.infer import generate, new_cache
from moe_train.infer.forward import InferenceModel
from moe_train.model.moe import MoE
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
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step = model(x[:, -1:], torch.full((2, 1), 7), cache, absorb=True)
            reduces = sum(e.name == "c10d::allreduce_" for e in prof.events())
            held = sum(p.numel() for p in model.parameters())
            out[ep, case] = {"tokens": tokens, "prefill": prefill, "step": step, "params": held}
            moe_blocks = sum(isinstance(step.layer.mlp, MoE) for step in model.layers)
            out[ep, case] |= {"reduces": reduces, "blocks": len(model.layers), "moe_blocks": moe_blocks}
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
            # one all-reduce per block: attention's and the MLP's (MoE: routed and shared rows together)
            # under tp; the MoE blocks' alone when tp = 1 (attention and dense MLPs are whole)
            tp = len(ranks) // ep
            assert g["reduces"] == (2 * g["blocks"] if tp > 1 else g["moe_blocks"]), (ep, case, r)


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


@pytest.mark.slow  # two processes through the command line
def test_the_command_line_splits_over_torchrun_ranks_and_rank_0_prints(tmp_path):
    byte_model_checkpoint(str(tmp_path))
    one = generate_main([str(tmp_path), "--prompt", "héllo", "--max-new-tokens", "6", "--no-eod-stop"])
    r0, r1 = run_world(2, _cli, str(tmp_path))
    assert r0["tokens"] == r1["tokens"] == one.tokens
    assert r0["out"].startswith("héllo") and r1["out"] == ""
    assert "over 2 ranks (tp=1, ep=2)" in r0["err"]
    with pytest.raises(SystemExit, match=r"--tp=2 --ep=1 needs 2 processes: launch with torchrun"):
        generate_main([str(tmp_path), "--prompt", "a", "--tp", "2"])


def _sharded_load(sources: dict[str, str]) -> dict:
    """ep=2: load each source with this rank's experts only, recording the tensors read; generate."""
    import torch.distributed.checkpoint as dcp

    from moe_train.hf import io as hf_io
    from moe_train.infer import load_for_inference
    from moe_train.parallel.tensor import decode_expert_slice

    dist.init_process_group("gloo")
    read: list[str] = []
    real_iter, real_load = hf_io.iter_tensors, dcp.load

    def iter_tensors(files, keys):
        keys = list(keys)
        read.extend(keys)
        return real_iter(files, keys)

    def load(state_dict, **kw):
        read.extend(state_dict)
        return real_load(state_dict, **kw)

    hf_io.iter_tensors, dcp.load = iter_tensors, load
    out = {}
    for name, path in sources.items():
        read.clear()
        experts = decode_expert_slice(BASE["n_routed_experts"], 2)
        loaded = load_for_inference(path, expert_slice=experts)
        model = parallelize_for_decode(loaded.model, ep=2)
        out[name] = {"tokens": generate(model, PROMPTS, 6).tokens, "read": list(read), "experts": experts}
    return out


@pytest.mark.slow  # two processes, three checkpoint formats written
def test_each_rank_reads_only_its_experts_from_hf_and_sharded_checkpoints(tmp_path):
    from moe_train.checkpoint import sharded
    from moe_train.checkpoint.sharded import model_entries
    from moe_train.hf.cli import export_checkpoint

    model = tiny("lora_q")
    yaml = OmegaConf.to_yaml(OmegaConf.structured(TrainConfig(model=model.cfg)))
    whole = tmp_path / "whole"
    save_checkpoint(str(whole / "checkpoints"), 5, model.state_dict(), None, {"step": 5}, yaml)
    export_checkpoint(str(whole), str(tmp_path / "hf"))
    sharded.save(
        str(tmp_path / "dcp"), 5, model_entries(model), {"step": 5, "has_optim": False}, {}, yaml, {}, None
    )
    sources = {"hf": str(tmp_path / "hf"), "sharded": str(tmp_path / "dcp" / "step_00000005")}
    want = generate(model, PROMPTS, 6).tokens
    ranks = run_world(2, _sharded_load, sources)
    n = BASE["n_routed_experts"]
    for r, got in enumerate(ranks):
        for name in sources:
            first, count = got[name]["experts"]
            assert (first, count) == (r * n // 2, n // 2)
            assert got[name]["tokens"] == want, (name, r)
            experts_read = {
                int(k.split(".experts.")[1].split(".")[0]) for k in got[name]["read"] if ".experts." in k
            }
            assert experts_read == set(range(first, first + count)), (name, r, experts_read)
        # the MTP depth is not built for generation: its tensors stay unread (HF: layer 3 of 3 + 1)
        assert not any(".mtp." in k for k in got["sharded"]["read"])
        assert not any(k.startswith(f"model.layers.{BASE['num_hidden_layers']}.") for k in got["hf"]["read"])


def test_expert_slices_find_their_slots_on_the_device():
    """The expert-parallel decode dispatcher finds its local slots without a host read (grouped experts in
    bf16, CUDA's path, so a rank's decode step can be captured in a CUDA graph), and the slices' partial
    rows add up to the whole MoE's."""
    from test_expert_parallel import CFG as EP_CFG

    from host_reads import HostReads, host_copies
    from moe_train.model.init import init_weights
    from moe_train.model.moe import MoEOptions
    from moe_train.parallel.tensor import ExpertSliceDispatcher

    cfg = dataclasses.replace(EP_CFG, n_shared_experts=0)  # the slices' partial rows alone
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = MoE(cfg, 1)
    init_weights(whole, 3, 0.3)
    with torch.no_grad():
        want = whole(x)
        got = torch.zeros_like(want)
        for first in (0, 4):  # two slices of 4 experts, summed as the block's finish would all-reduce them
            part = MoE(cfg, 1, MoEOptions(expert_slice=(first, 4)))
            init_weights(part, 3, 0.3)
            part.dispatcher = ExpertSliceDispatcher(first, 4)
            got += part(x)
            part.to(torch.bfloat16).experts.impl = "grouped"
            with host_copies() as host, HostReads() as r:
                part(x.to(torch.bfloat16))
            assert (r.reads, host) == ([], []), (first, r.reads, host)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

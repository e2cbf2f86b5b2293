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


def _outputs_and_split_load(sources: dict[str, str]) -> tuple[dict, dict]:
    return _outputs([2]), _split_load(sources, [2])


@pytest.mark.slow  # 4 processes
def test_tp2_by_ep2_generation_equals_one_process_and_reads_only_its_parts(tmp_path):
    model, sources = _checkpoints(tmp_path)
    ranks = run_world(4, _outputs_and_split_load, sources)
    _check(_outputs([None]), [r[0] for r in ranks], 2)
    _check_split_load(model, [r[1] for r in ranks])


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


def _split_load(sources: dict[str, str], layouts: list[int]) -> dict:
    """For each ep in `layouts` (tp = world / ep): load each source cut first (`load_for_decode`), recording
    what is read (whole tensors by key, parts as element counts); generate, and a prefill's logits."""
    from moe_train.checkpoint.slices import SlicedFileSystemReader
    from moe_train.hf import io as hf_io
    from moe_train.infer import load as infer_load
    from moe_train.parallel.tensor import load_for_decode

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    whole: dict[str, int] = {}  # key -> elements, of keys read whole
    parts: dict[str | int, int] = {}  # key -> elements read of it in parts
    real_iter, real_readers = hf_io.iter_tensors, hf_io.iter_readers
    real_read_data, real_copy = SlicedFileSystemReader.read_data, infer_load.copy_slice

    def counted(key, read):
        def part(box):
            t = read(box)
            parts[key] = parts.get(key, 0) + t.numel()
            return t

        return part

    def iter_tensors(files, keys):
        for k, t in real_iter(files, keys):
            whole[k] = t.numel()
            yield k, t

    def iter_readers(files, keys):
        return ((k, counted(k, read)) for k, read in real_readers(files, keys))

    def read_data(self, plan, planner):
        for item in plan.items:  # what the planner asks for; a part is read as its byte ranges alone
            key, n = item.storage_index.fqn, int(torch.Size(item.lengths).numel())
            if key in planner.slices:
                parts[key] = parts.get(key, 0) + n
            else:
                whole[key] = whole.get(key, 0) + n
        return real_read_data(self, plan, planner)

    def copy_slice(dest, read, shape, sl, box=None):
        return real_copy(dest, counted(dest.data_ptr(), read), shape, sl, box)  # named once loaded

    hf_io.iter_tensors, hf_io.iter_readers = iter_tensors, iter_readers
    SlicedFileSystemReader.read_data, infer_load.copy_slice = read_data, copy_slice
    out = {}
    x = ids((2, 7), seed=1)
    for ep in layouts:
        for name, path in sources.items():
            whole.clear()
            parts.clear()
            model = load_for_decode(path, ep=ep).model
            names = {p.data_ptr(): n for n, p in model.named_parameters()}
            tp = dist.get_world_size() // ep
            rank, per, vocab = dist.get_rank() % tp, model.lm_head.weight.shape[0], model.cfg.vocab_size
            pad = per - (min(vocab, (rank + 1) * per) - rank * per) if tp > 1 else 0
            out[ep, name] = {
                "tokens": generate(model, PROMPTS, 6).tokens,
                "logits": model(x, torch.arange(7).expand(2, 7), new_cache(model, 2, 8), absorb=False),
                "whole": dict(whole),
                "parts": {names.get(k, k): v for k, v in parts.items()},
                "held": sum(t.numel() for t in model.state_dict().values()) - pad * model.cfg.hidden_size,
                "params": sum(p.numel() for p in model.parameters()),
            }
    return out


def _checkpoints(tmp_path) -> tuple[torch.nn.Module, dict[str, str]]:
    """The tiny model and the three sources it is written to: an HF directory, a sharded and a whole-model
    training checkpoint."""
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
    return model, {
        "hf": str(tmp_path / "hf"),
        "sharded": str(tmp_path / "dcp" / "step_00000005"),
        "whole": str(whole),
    }


def _check_split_load(model: torch.nn.Module, ranks: list[dict]) -> None:
    """Each rank generates the one-process tokens and logits (fp32, rel ≤ 1e-5), reads only its experts, never
    the MTP depth, and exactly as many elements as it holds (no tensor it cuts read whole, none twice)."""
    world, n, layers = len(ranks), BASE["n_routed_experts"], BASE["num_hidden_layers"]
    want = generate(model, PROMPTS, 6).tokens
    ref = InferenceModel(model)
    x = ids((2, 7), seed=1)
    logits = ref(x, torch.arange(7).expand(2, 7), new_cache(ref, 2, 8), absorb=False)
    one = sum(p.numel() for p in model.parameters())
    for r, got in enumerate(ranks):
        for (ep, name), g in got.items():
            tp = world // ep
            assert g["tokens"] == want, (ep, name, r)
            assert rel_err(g["logits"], logits) <= 1e-5, (ep, name, r)
            assert g["params"] < one, (ep, name, r)  # a split model
            # tp cuts attention, the MLPs, every expert and the head; ep alone only the shared experts (cut
            # over every rank so that one all-reduce sums them with the routed rows)
            cut = {"o_proj", "kv_b_proj", "shared_experts", "head"} if tp > 1 else {"shared_experts"}
            assert {c for c in cut if any(c in str(k) for k in g["parts"])} == cut, (ep, name, r)
            assert tp > 1 or all("shared_experts" in str(k) for k in g["parts"]), (ep, name, r)
            if name == "whole":  # a memory-mapped model.pt: parts are views, the rest is not counted
                continue
            read = {k.replace("model.", "", 1) for k in [*g["whole"], *g["parts"]]}
            experts = {int(k.split(".experts.")[1].split(".")[0]) for k in read if ".experts." in k}
            e = r // tp
            assert experts == set(range(e * n // ep, (e + 1) * n // ep)), (ep, name, r, experts)
            assert not any(".mtp." in k or k.startswith(f"layers.{layers}.") for k in read), (ep, name, r)
            assert sum(g["whole"].values()) + sum(g["parts"].values()) == g["held"], (ep, name, r)
            assert not set(g["parts"]) & set(g["whole"]), (ep, name, r)


@pytest.mark.slow  # two processes, three checkpoint formats written
def test_tp2_and_ep2_read_only_their_parts_of_hf_and_training_checkpoints(tmp_path):
    model, sources = _checkpoints(tmp_path)
    _check_split_load(model, run_world(2, _split_load, sources, [1, 2]))  # tp=2, then ep=2


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

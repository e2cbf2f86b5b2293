"""ZeRO-Inference (infer/offload.py): DeepSpeed ZeRO-3 parameter offload gives the resident model's tokens.

On this CPU machine DeepSpeed runs on its CPU accelerator: `offload_param.device=cpu` then keeps the
partitioned weights in (unpinned) CPU memory and gathers a layer's weights into full tensors when its
`LayerStep` runs — the same hooks, trace and release logic as on a GPU, without the copy across PCIe.  The
tests check that the weights really are released between steps (partitioned, empty `.data`), that greedy
tokens equal the resident model's on both attention paths, through `load_for_inference` and the CLI, and the
clear errors: bad settings, NVMe without DeepSpeed's async_io op (libaio), mixed dtypes under NVMe.
The GPU half (a model larger than a memory budget) is bench/decode.py.
"""

from __future__ import annotations

import io

import pytest
import torch
from test_infer import BASE, byte_model_checkpoint, ids, tiny

from distributed import run_world
from moe_train.config import ModelConfig
from moe_train.generate import main as generate_main
from moe_train.infer import InferenceModel, generate, load_for_inference
from moe_train.infer.offload import OffloadConfig, ds_config, nvme_dtype_problem, nvme_unavailable_reason
from moe_train.model import build_model
from moe_train.model.moe import MoE


def _offload_case(ckpt_dir: str) -> dict:
    """In a fresh process: offload the tiny model, generate, inspect DeepSpeed's parameter states."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from moe_train.infer.offload import offload_model

    torch.set_num_threads(1)
    model = tiny()
    prompts = [ids((1, n), seed=30 + n)[0].tolist() for n in (3, 8)]
    ref = {absorb: generate(model, prompts, 8, absorb=absorb).tokens for absorb in (True, False)}
    im = offload_model(model, OffloadConfig("cpu", pin_memory=False), "cpu")  # experts: the chosen ones
    got = {absorb: generate(im, prompts, 8, absorb=absorb).tokens for absorb in (True, False)}
    released = {
        name: (p.ds_status == ZeroParamStatus.NOT_AVAILABLE, p.data.numel() == 0, p.ds_tensor.device.type)
        for name, p in im.named_parameters()
    }
    # one token through every layer: each MoE layer fetches exactly the k experts its router chose
    im.expert_stage.fetched = 0
    generate(im, [prompts[0][:1]], 1)
    one_token = im.expert_stage.fetched
    layered = offload_model(tiny(), OffloadConfig("cpu", pin_memory=False, experts="layer"), "cpu")
    got_layered = {absorb: generate(layered, prompts, 8, absorb=absorb).tokens for absorb in (True, False)}
    # the whole stack: a checkpoint loaded with offload="cpu", and the CLI's --offload
    loaded = load_for_inference(ckpt_dir, "cpu", offload="cpu")
    out, err = io.StringIO(), io.StringIO()
    cli = generate_main([ckpt_dir, "--prompt", "hi", "--max-new-tokens", "5", "--offload", "cpu"], out, err)
    return {
        "ref": ref,
        "got": got,
        "got_layered": got_layered,
        "one_token": one_token,
        "moe_layers": sum(isinstance(step.layer.mlp, MoE) for step in im.layers),
        "expert_params": sum(".experts." in n for n, _ in layered.named_parameters()),
        "released": released,
        "loaded_type": type(loaded.model).__name__,
        "loaded_offload": loaded.model.offload,
        "loaded_tokens": generate(loaded.model, prompts, 6).tokens,
        "cli_tokens": cli.tokens,
        "cli_err": err.getvalue(),
    }


@pytest.mark.slow  # DeepSpeed ZeRO-3 start-up
def test_zero3_cpu_offload_generates_the_resident_models_tokens(tmp_path):
    model = byte_model_checkpoint(str(tmp_path))
    (res,) = run_world(1, _offload_case, str(tmp_path))

    assert res["got"] == res["ref"] == res["got_layered"]  # absorbed and plain decode alike
    assert res["ref"][True] == res["ref"][False]
    # the chosen-expert fetch: k experts per MoE layer for one token, and no routed expert under ZeRO
    assert res["one_token"] == BASE["num_experts_per_tok"] * res["moe_layers"] and res["moe_layers"] > 0
    assert not any(".experts." in n for n in res["released"])
    assert res["expert_params"] == 2 * res["moe_layers"]  # experts=layer: ZeRO streams them with the layer
    matrices = {n: s for n, s in res["released"].items() if "norm" not in n}
    norms = {n: s for n, s in res["released"].items() if "norm" in n}
    assert len(matrices) > 15 and norms
    # every matrix is partitioned in CPU memory between steps: it was gathered only while its layer ran
    assert all(s == (True, True, "cpu") for s in matrices.values()), matrices
    assert all(s[0] is False for s in norms.values())  # tiny (<= hidden size) weights stay resident

    prompts = [ids((1, n), seed=30 + n)[0].tolist() for n in (3, 8)]
    assert res["loaded_type"] == "InferenceModel" and res["loaded_offload"] == "cpu"
    assert res["loaded_tokens"] == generate(model, prompts, 6).tokens
    assert res["cli_tokens"] == generate(model, [list(b"hi")], 5).tokens
    assert "weights offloaded to cpu" in res["cli_err"]


def _spread_case(ckpt_dir: str) -> dict:
    """On each of 2 ranks: offload the tiny model spread over both, generate this rank's own prompts (rank 1
    fewer, and stopping at its first token, so rank 0 decodes on alone), against the resident model; then
    the CLI's --offload under the same two ranks, with three prompts and with one."""
    import datetime

    import torch.distributed as dist

    from moe_train.infer.offload import ChosenExperts, offload_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a rank left waiting fails
    rank = dist.get_rank()
    lengths = (3, 8) if rank == 0 else (5,)
    prompts = [ids((1, n), seed=40 + n + 10 * rank)[0].tolist() for n in lengths]
    first = generate(tiny(), prompts, 1).tokens[0][0]
    stops = [first] if rank == 1 else []
    ref = generate(tiny(), prompts, 8, stop_tokens=stops).tokens
    whole = {n: p.numel() for n, p in tiny().named_parameters()}
    im = offload_model(tiny(), OffloadConfig("cpu", pin_memory=False), "cpu")
    got = generate(im, prompts, 8, stop_tokens=stops).tokens
    experts = [m for m in im.modules() if isinstance(m, ChosenExperts)]
    cli = {}
    for texts in (["hi", "abc", "xyz"], ["hey"]):
        out, err = io.StringIO(), io.StringIO()
        argv = [ckpt_dir, "--max-new-tokens", "5", "--offload", "cpu", "--no-eod-stop"]
        result = generate_main([*argv, *(a for t in texts for a in ("--prompt", t))], out, err)
        cli[len(texts)] = (result.tokens, out.getvalue(), err.getvalue())
    return {
        "cli": cli,
        "ref": ref,
        "got": got,
        "fetched": im.expert_stage.fetched,
        "host_numel": sum(h.numel() for m in experts for h in m.host),
        "experts_numel": sum(v for n, v in whole.items() if n.startswith("layers.") and ".experts." in n),
        "partitions": {n: (p.ds_tensor.numel(), p.ds_numel) for n, p in im.named_parameters()},
        "collective": im.collective is not None,
    }


@pytest.mark.slow  # DeepSpeed ZeRO-3 start-up, two processes
def test_offload_spread_over_two_ranks_decodes_each_ranks_prompts_as_resident(tmp_path):
    """ZeRO-Inference over several ranks (infer/offload.py): each rank holds half of every weight (ZeRO-3's
    partitions, the routed experts' slices) and decodes its own prompts to the resident model's tokens; a
    rank done first keeps stepping with the other, and the chosen experts are the union of both ranks'."""
    model = byte_model_checkpoint(str(tmp_path))
    res = run_world(2, _spread_case, str(tmp_path))
    for r in res:
        assert r["got"] == r["ref"] and r["collective"]
    assert len(res[1]["got"][0]) == 1 and len(res[0]["got"][0]) == 8  # rank 1 stopped at its first token
    assert res[0]["fetched"] == res[1]["fetched"] > 0  # the same experts fetched on both: the union
    for r in res:  # half the routed experts' rows in host memory here (an odd count padded by one row)
        half = r["experts_numel"] / 2
        assert half <= r["host_numel"] <= half + 2 * BASE["n_routed_experts"] * BASE["num_hidden_layers"] * 64
        matrices = {n: v for n, v in r["partitions"].items() if "norm" not in n}
        assert matrices and all(part == -(-whole // 2) for part, whole in matrices.values()), matrices
    # the CLI: rank 0 decodes prompts 0 and 2, rank 1 prompt 1; rank 0 prints all three in order
    texts = ["hi", "abc", "xyz"]
    want = [generate(model, [list(t.encode())], 5).tokens[0] for t in texts]
    assert res[0]["cli"][3][0] == [want[0], want[2]] and res[1]["cli"][3][0] == [want[1]]
    printed = res[0]["cli"][3][1]
    assert [line.split("] ")[1] for line in printed.splitlines()] == [
        t + bytes(w).decode("utf-8", "replace") for t, w in zip(texts, want, strict=True)
    ]
    assert res[1]["cli"][3][1] == "" and "spread over 2 ranks" in res[0]["cli"][3][2]
    one = res[0]["cli"][1]  # one prompt: rank 0 decodes and streams it, rank 1 steps along unprinted
    assert one[0] == generate(model, [list(b"hey")], 5).tokens and one[1].startswith("hey")


def test_offload_settings_and_config():
    with pytest.raises(ValueError, match="offload='gpu': allowed values are cpu, nvme"):
        OffloadConfig("gpu")
    with pytest.raises(ValueError, match="nvme_path"):
        OffloadConfig("nvme")
    with pytest.raises(ValueError, match="prefetch_layers"):
        OffloadConfig("cpu", prefetch_layers=-1)
    with pytest.raises(ValueError, match="experts='all': allowed values are auto, chosen, layer"):
        OffloadConfig("cpu", experts="all")
    with pytest.raises(ValueError, match="offload=nvme with experts=chosen"):
        OffloadConfig("nvme", "/mnt/nvme", experts="chosen")
    assert OffloadConfig("cpu").chosen_experts and not OffloadConfig("nvme", "/mnt/nvme").chosen_experts
    assert not OffloadConfig("cpu", experts="layer").chosen_experts
    model = InferenceModel(tiny())
    layer = max(sum(p.numel() for p in step.parameters()) for step in model.layers)
    head = model.lm_head.weight.numel()
    zero = ds_config(model, OffloadConfig("cpu", prefetch_layers=2))["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_prefetch_bucket_size"] == 2 * layer
    assert zero["stage3_max_live_parameters"] == 3 * layer + head
    assert zero["stage3_param_persistence_threshold"] == BASE["hidden_size"]
    assert zero["memory_efficient_linear"] is False  # DeepSpeed would patch F.linear process-wide
    nvme = ds_config(model, OffloadConfig("nvme", "/mnt/nvme"))["zero_optimization"]["offload_param"]
    assert nvme["nvme_path"] == "/mnt/nvme"
    assert nvme["buffer_size"] == max(p.numel() for p in model.parameters())
    per_layer = max(len(list(step.parameters())) for step in model.layers)
    assert nvme["buffer_count"] == 2 * per_layer + 2


def test_nvme_errors_name_the_problem_and_cpu(tmp_path):
    reason = nvme_unavailable_reason()
    if reason is None:
        pytest.skip("DeepSpeed's async_io op is available here: no error to check")
    assert "async_io" in reason and "libaio" in reason and "offload=cpu works" in reason
    with pytest.raises(RuntimeError, match="async_io"):
        load_for_inference(str(tmp_path), offload=OffloadConfig("nvme", str(tmp_path)))  # before any loading
    with pytest.raises(RuntimeError, match="offload=cpu works"):
        generate_main([str(tmp_path), "--prompt", "x", "--offload", "nvme", "--nvme-path", str(tmp_path)])
    with pytest.raises(SystemExit, match="--nvme-path is for --offload nvme"):
        generate_main([str(tmp_path), "--prompt", "x", "--nvme-path", str(tmp_path)])


def test_nvme_refuses_large_parameters_in_another_dtype():
    """DeepSpeed's NVMe swapper holds one dtype: a bf16 model's fp32 router of ≥ 1 MiB (in bf16) would be
    swapped as bf16.  Built on the meta device: only shapes and dtypes matter."""
    cfg = ModelConfig(**{**BASE, "hidden_size": 1024, "n_routed_experts": 512, "n_group": 1, "topk_group": 1})
    model = build_model(cfg, device="meta")
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.data = p.data.to(torch.float32 if type(m).__name__ == "Router" else torch.bfloat16)
    problem = nvme_dtype_problem(InferenceModel(model))
    assert problem is not None and "mlp.gate.weight" in problem and "offload=cpu" in problem
    assert nvme_dtype_problem(InferenceModel(tiny())) is None  # one dtype throughout

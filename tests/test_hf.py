"""Hugging Face DeepSeek-V3 checkpoints: config mapping, logits against transformers, round trips, the CLI.

transformers' DeepseekV3ForCausalLM is the outside numerical reference: random tiny models go through
save_pretrained/from_pretrained in both directions and the logits must agree to 1e-5 (fp32, CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from moe_train.checkpoint import load_checkpoint, save_checkpoint
from moe_train.config import ConfigError, ModelConfig, TrainConfig, load_config, to_object
from moe_train.hf import (
    from_pretrained,
    hf_config_to_model_config,
    load_hf_weights,
    model_config_to_hf_config,
    save_pretrained,
)
from moe_train.hf.cli import main as cli_main
from moe_train.hf.cli import read_model_config
from moe_train.model import build_model
from moe_train.model.moe import MoE, Router
from moe_train.train.trainer import Trainer

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN = 1e-4  # routing decisions closer than this could flip on fp32 rounding between implementations
TOL = 1e-5

BASE = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
    "rope_theta": 10000.0,
}
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.8,
}
CASES = {
    "full_q_groups_yarn": dict(
        q_lora_rank=None,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
        rope_scaling=YARN,
    ),
    "lora_q_no_groups_all_moe_no_shared": dict(
        q_lora_rank=24,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        n_shared_experts=0,
        rope_scaling=None,
        rms_norm_eps=1e-4,  # the latent norms must still use 1e-6 (DeepSeek reference, transformers)
        routed_scaling_factor=1.0,
    ),
    "lora_q_4_groups_two_shared_unnormalised_yarn": dict(
        q_lora_rank=24,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=2,
        n_shared_experts=2,
        norm_topk_prob=False,
        routed_scaling_factor=2.5,
        rope_scaling={**YARN, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}


def hf_dict(case: str, **extra) -> dict:
    return {**BASE, **CASES[case], **extra}


def transformers_model(d: dict, seed: int) -> DeepseekV3ForCausalLM:
    """A random transformers model for config dict `d`, built with transformers' own spelling."""
    kw = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta", "num_nextn_predict_layers")}
    rope = {"rope_type": "default"} if d.get("rope_scaling") is None else dict(d["rope_scaling"])
    rope.pop("type", None)
    rope.update(rope_type=rope.get("rope_type", "yarn"), rope_theta=d["rope_theta"])
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**kw, rope_parameters=rope, attn_implementation="eager")
    with quiet():  # n_shared_experts=0 builds zero-size layers, which torch's init warns about
        model = DeepseekV3ForCausalLM(cfg).eval()
    perturb(model)
    return model


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Random non-zero selection biases (their init is zero) and norm weights (init ones)."""
    g = torch.Generator().manual_seed(7)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        elif name.endswith("norm.weight"):
            t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))


def routing_margin(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Smallest gap, over tokens and MoE layers, between the last chosen and first rejected expert/group."""
    seen: list[tuple[Router, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach())))
        for m in model.modules()
        if isinstance(m, Router)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    margin = float("inf")
    for r, x in seen:
        s = torch.nn.functional.linear(x.float(), r.weight.detach().float())
        s = s.sigmoid() + r.e_score_correction_bias if r.scoring == "sigmoid" else s.softmax(-1)
        if r.n_group > 1:
            grouped = s.view(s.shape[0], r.n_group, -1)
            gs = grouped.topk(2, -1).values.sum(-1) if r.scoring == "sigmoid" else grouped.amax(-1)
            top = gs.topk(r.topk_group + 1, -1).values
            margin = min(margin, float((top[:, -2] - top[:, -1]).min()))
            keep = gs.topk(r.topk_group, -1).indices
            mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, keep, True)
            s = s.masked_fill(~mask.repeat_interleave(grouped.shape[-1], 1), float("-inf"))
        top = s.topk(r.top_k + 1, -1).values
        margin = min(margin, float((top[:, -2] - top[:, -1]).min()))
    return margin


def clear_inputs(model: torch.nn.Module, vocab: int, shape=(2, 12)) -> torch.Tensor:
    """Token ids whose routing has no near-ties, so both implementations must pick the same experts."""
    for seed in range(50):
        ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
        if routing_margin(model, ids) >= MARGIN:
            return ids
    raise AssertionError("no input without routing near-ties in 50 tries")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers warns about things irrelevant here (unused MTP keys, deprecated spellings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    ref = transformers_model(hf_dict(case), seed=1)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="MTP depths"):  # transformers writes no MTP weights
        ours = from_pretrained(str(tmp_path)).eval()
    ids = clear_inputs(ours, BASE["vocab_size"])
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref(ids).logits) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_train_export_loads_in_transformers_with_equal_logits(case, tmp_path):
    cfg = hf_config_to_model_config({**hf_dict(case), "num_nextn_predict_layers": 1})
    ours = build_model(cfg, seed=2).eval()
    perturb(ours)
    save_pretrained(ours, str(tmp_path), max_shard_size="200KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")  # sharded
    with quiet():
        ref = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids = clear_inputs(ours, cfg.vocab_size)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref(ids).logits) <= TOL


def test_mtp_layer_matches_transformers_mtp_model(tmp_path):
    """The exported MTP depth, read by transformers' own MtpModel loader, computes what ours does.

    This pins the hub's eh_proj column order ([embedding; hidden], ours is [hidden; embedding]) and the
    shared_head.norm mapping.  Both sides are fed the same hidden states: which hidden state feeds MTP
    (before or after the final norm) is the model's business, not the checkpoint format's.
    """
    from transformers.modeling_layers import MtpModel

    cfg = hf_config_to_model_config({**hf_dict("full_q_groups_yarn"), "num_nextn_predict_layers": 1})
    ours = build_model(cfg, seed=3).eval()
    perturb(ours)
    save_pretrained(ours, str(tmp_path))
    with quiet():
        main = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
        # its MTP key pattern is DeepSeek-V3's (layer 61); point it at this model's MTP layer
        main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_hidden_layers}\..*"]
        mtp = MtpModel.from_pretrained(main).eval()
    seq = clear_inputs(ours, cfg.vocab_size, shape=(2, 13))
    inputs, nxt = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        h = ours.hidden_states(inputs)
        mine = ours.lm_head(ours.mtp[0].norm(ours.mtp[0](h, ours.embed_tokens(nxt), None)))
        pos = torch.arange(inputs.shape[1]).unsqueeze(0)
        theirs = mtp.shared_head(mtp.forward_layer(0, h, pos, None, input_ids=nxt))
    assert rel_err(mine, theirs) <= TOL


def test_softmax_router_follows_deepseek_reference():
    """scoring_func=softmax: transformers' DeepseekV3 ignores the field (always sigmoid); the DeepSeek-V3
    reference takes the softmax, limits groups by their best expert, and does not renormalise."""
    d = hf_dict(
        "full_q_groups_yarn", scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False
    )
    d.update(n_routed_experts=8, n_group=4, topk_group=2, routed_scaling_factor=1.5)
    cfg = hf_config_to_model_config(d)
    model = build_model(cfg, seed=4).requires_grad_(False)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(1, 40, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    flat = x.view(-1, cfg.hidden_size)
    scores = (flat @ moe.gate.weight.T).softmax(-1)
    best = scores.view(-1, 4, 2).amax(-1)
    keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(2, -1).indices, True)
    idx = scores.masked_fill(~keep.repeat_interleave(2, 1), float("-inf")).topk(2, -1).indices
    weight = scores.gather(1, idx) * 1.5
    expected = torch.zeros_like(flat)
    for j in range(2):
        for t in range(flat.shape[0]):
            e = int(idx[t, j])
            g, u = (moe.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            expected[t] += weight[t, j] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    expected += moe.shared_experts(flat)
    with torch.no_grad():
        assert rel_err(moe(x).view(-1, cfg.hidden_size), expected) <= TOL


# ------------------------------------------------------------------------------------------ round trips


def random_checkpoint(root, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A moe_train checkpoint of a random model (non-zero biases) under `root`; returns its state."""
    model = build_model(cfg, seed=5)
    perturb(model)
    state = model.state_dict()
    yaml = OmegaConf.to_yaml(OmegaConf.structured(TrainConfig(model=cfg)))
    save_checkpoint(str(root), 7, state, None, {"step": 7}, yaml)
    return state


def test_export_import_round_trip_is_bit_identical_with_mtp(tmp_path):
    cfg = hf_config_to_model_config(
        {**hf_dict("lora_q_4_groups_two_shared_unnormalised_yarn"), "num_nextn_predict_layers": 2}
    )
    state = random_checkpoint(tmp_path / "run" / "checkpoints", cfg)
    cli_main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--max-shard-size", "300KB"])
    files = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in files and "config.json" in files
    hub = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hub["num_nextn_predict_layers"] == 2 and hub["rope_scaling"]["type"] == "yarn"
    assert "rope_parameters" not in hub and "num_mtp_layers" not in hub  # the hub spelling
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    n = cfg.num_hidden_layers
    for key in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{n + 1}.{key}.weight" in weight_map
    assert f"model.layers.{n}.mlp.experts.15.up_proj.weight" in weight_map

    cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    back = load_checkpoint(str(tmp_path / "imported"))
    assert back["meta"]["step"] == 0 and back["optim"] is None
    assert set(back["model"]) == set(state)
    for k, v in state.items():
        assert v.dtype == back["model"][k].dtype and torch.equal(v, back["model"][k]), k
    assert read_model_config(back["path"]) == cfg


def test_config_spellings_and_round_trip():
    hub = {**hf_dict("full_q_groups_yarn"), "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16"}
    current = {
        k: v for k, v in hub.items() if k not in ("rope_scaling", "rope_theta", "num_nextn_predict_layers")
    }
    rope = {k: v for k, v in YARN.items() if k != "type"}
    current.update(
        rope_parameters={**rope, "rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0},
        num_mtp_layers=1,
        dtype="bfloat16",
        head_dim=8,
        qk_head_dim=24,
        rope_interleave=True,
        transformers_version="5.24.0",
        bos_token_id=0,
        eos_token_id=1,
        architectures=["DeepseekV3ForCausalLM"],
    )
    a, b = hf_config_to_model_config(hub), hf_config_to_model_config(current)
    assert a == b
    # transformers defaults num_key_value_heads to 128 whatever the heads; MLA ignores the field
    assert hf_config_to_model_config({**hub, "num_key_value_heads": 128}) == replace(
        a, num_key_value_heads=None
    )
    assert a.rope_scaling == YARN and a.num_nextn_predict_layers == 1 and a.q_lora_rank is None
    assert hf_config_to_model_config(model_config_to_hf_config(a)) == a
    # a missing field means transformers' default, as it does to every other reader
    no_scale = {k: v for k, v in hub.items() if k != "routed_scaling_factor"}
    assert hf_config_to_model_config(no_scale).routed_scaling_factor == 2.5


@pytest.mark.parametrize(
    "change, named",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
        ({"topk_method": "random"}, "topk_method"),
        ({"some_new_field": 1}, "some_new_field"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.707}}, "mscale_all_dim"),
        ({"num_experts_per_tok": 1}, "norm_topk_prob"),
        ({"topk_method": "greedy", "n_group": 2, "topk_group": 1}, "greedy"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_config_fields_are_named(change, named):
    with pytest.raises(ConfigError, match=named):
        hf_config_to_model_config({**hf_dict("full_q_groups_yarn"), **change})


def test_load_hf_weights_streams_into_a_built_model_and_names_shape_mismatches(tmp_path):
    ref = transformers_model(hf_dict("lora_q_no_groups_all_moe_no_shared"), seed=6)
    ref.save_pretrained(tmp_path)
    cfg = hf_config_to_model_config(json.loads((tmp_path / "config.json").read_text()))
    model = build_model(cfg, seed=9)
    mtp_before = copy.deepcopy(model.mtp.state_dict())
    with pytest.warns(UserWarning, match="MTP depths"):
        load_hf_weights(model, str(tmp_path))
    ids = clear_inputs(model, cfg.vocab_size)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref(ids).logits) <= TOL
    assert all(torch.equal(v, model.mtp.state_dict()[k]) for k, v in mtp_before.items())

    other = copy.deepcopy(cfg)
    other.hidden_size, other.n_routed_experts = 32, 4
    with pytest.raises(ValueError, match="hidden_size: checkpoint 64 vs model 32.*n_routed_experts"):
        load_hf_weights(build_model(other), str(tmp_path))


def test_load_hf_weights_into_an_expert_parallel_slice(tmp_path):
    cfg = hf_config_to_model_config({**hf_dict("full_q_groups_yarn"), "num_nextn_predict_layers": 1})
    full = build_model(cfg, seed=10)
    perturb(full)
    save_pretrained(full, str(tmp_path))
    part = build_model(cfg, seed=11, expert_slice=(4, 4))
    load_hf_weights(part, str(tmp_path))
    got, want = part.state_dict(), full.state_dict()
    assert set(got) == set(want)
    for k, v in got.items():
        assert torch.equal(v, want[k][4:8] if ".experts." in k else want[k]), k


def test_trainer_init_from_hf_directory(tmp_path):
    ref = transformers_model(hf_dict("full_q_groups_yarn", vocab_size=257), seed=8)
    ref.save_pretrained(tmp_path / "hf")
    cfg = hf_config_to_model_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    overrides = ["data=synthetic", "data.synthetic_tokens=20000", "data.seq_len=16", "data.batch_size=2"]
    tc = to_object(load_config([*overrides, "trainer.progress=false", "logger.console=false"]))
    tc.model = replace(cfg, init_from=str(tmp_path / "hf"))
    tc.run_dir = str(tmp_path / "run")
    tc.data.cache_dir = str(tmp_path / "cache")
    with quiet():
        trainer = Trainer(tc, tc.run_dir)
    got, want = trainer.model.state_dict(), ref.state_dict()
    assert torch.equal(got["embed_tokens.weight"], want["model.embed_tokens.weight"])
    assert torch.equal(got["layers.1.mlp.experts.down_proj"], want["model.layers.1.mlp.experts.down_proj"])


def test_python_dash_m_prints_the_model_section(tmp_path):
    save_pretrained(build_model(hf_config_to_model_config(hf_dict("full_q_groups_yarn"))), str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "moe_train.hf", "config", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "hidden_size: 64" in out and "type: yarn" in out

"""Hugging Face DeepSeek-V3 ``config.json`` <-> :class:`ModelConfig`.

Reading accepts both spellings found in the wild: the hub files' (``rope_scaling`` with ``type``, top-level
``rope_theta``, ``num_nextn_predict_layers``) and current transformers' (``rope_parameters`` with
``rope_type`` and ``rope_theta`` inside, ``num_mtp_layers``).  Writing uses the hub spelling, which every
reader (DeepSeek's own code, transformers, vLLM) understands.

A field is either mapped, ignored because it cannot change the forward pass (token ids, dtype, versions,
training-loss knobs), accepted only at the one value moe_train implements, or refused: an unknown field or an
unsupported value raises :class:`ConfigError` naming it, because silently dropping it would give a model that
computes something else than the checkpoint's authors meant.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import YARN_KEYS, ConfigError, ModelConfig, validate_model

# transformers' DeepseekV3Config defaults (plus the hub-only fields of DeepSeek's configuration_deepseek.py):
# a field missing from config.json means this value to every reader, so it must mean it to us too.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": None,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "num_nextn_predict_layers": 1,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# Fields that map one to one onto ModelConfig (rope_scaling/rope_theta are handled on their own).
_MAPPED = tuple(k for k in HF_DEFAULTS if k != "rope_theta")

# Fields that cannot change the forward pass: ids, dtypes, bookkeeping, training-loss and parallelism knobs.
_IGNORED = frozenset(
    {
        "architectures",
        "auto_map",
        "model_type",  # checked
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "output_router_logits",
        "router_aux_loss_coef",
        "aux_loss_alpha",
        "seq_aux",
        "ep_size",
        "pretraining_tp",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "use_bfloat16",
        "tokenizer_class",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tie_encoder_decoder",
    }
)

# Fields accepted only at the values moe_train computes (None: absent or null), with what to tell the user.
_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "rope_interleave": ((True, None), "true (false rotates halves: another function of the same weights)"),
    "attention_dropout": ((0, 0.0, None), "0 (moe_train has no dropout)"),
    "quantization_config": (
        (None,),
        "absent: dequantize FP8 checkpoints to bf16 first (DeepSeek's inference/fp8_cast_bf16.py) and "
        "remove quantization_config",
    ),
}

# DeepSeek's hub code defaults for YaRN keys a file leaves out (moe_train.model.rope uses the same).
_YARN_DEFAULTS = {"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}

# Fields that fix tensor shapes: a checkpoint whose config differs in any of them cannot load into a model.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_shared_experts",
    "n_routed_experts",
    "first_k_dense_replace",
    "moe_layer_freq",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "num_nextn_predict_layers",
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b


def _read_rope(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling in moe_train's form) from either spelling."""
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if scaling is not None and params is not None:
        # a file may carry both spellings; two different answers are ambiguous
        def strip(x: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in x.items() if k not in ("type", "rope_type", "rope_theta")}

        if strip(dict(scaling)) != strip(dict(params)):
            raise ConfigError(f"{source}: rope_scaling={scaling!r} and rope_parameters={params!r} disagree")
    rs = dict(params if params is not None else scaling or {})
    theta = d.get("rope_theta")
    if "rope_theta" in rs:
        inner = rs.pop("rope_theta")
        if theta is not None and not _same(theta, inner):
            raise ConfigError(
                f"{source}: rope_theta={theta!r} and rope_parameters.rope_theta={inner!r} disagree"
            )
        theta = inner
    theta = float(HF_DEFAULTS["rope_theta"] if theta is None else theta)
    kinds = {rs.pop(k) for k in ("type", "rope_type") if k in rs}
    if len(kinds) > 1:
        raise ConfigError(f"{source}: rope type given twice with different values {sorted(map(str, kinds))}")
    kind = kinds.pop() if kinds else None
    if kind in (None, "default") and not rs:
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope_scaling.type={kind!r} is not supported: yarn (or no rope_scaling)")
    if rs.pop("truncate", True) is not True:
        raise ConfigError(f"{source}: rope_scaling.truncate=false is not supported (DeepSeek-V3 truncates)")
    if rs.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise ConfigError(
            f"{source}: rope_scaling.partial_rotary_factor={rs['partial_rotary_factor']!r}: 1.0"
        )
    rs.pop("partial_rotary_factor", None)
    if rs.get("attention_factor") is not None:
        raise ConfigError(
            f"{source}: rope_scaling.attention_factor={rs['attention_factor']!r} is not supported: moe_train "
            "derives YaRN's attention factor from mscale/mscale_all_dim as DeepSeek-V3 does"
        )
    rs.pop("attention_factor", None)
    unknown = sorted(set(rs) - set(YARN_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: rope_scaling keys {unknown} are not supported; known: {list(YARN_KEYS)}"
        )
    if rs.get("factor") is None:
        raise ConfigError(f"{source}: rope_scaling.factor is required for yarn")
    out: dict[str, Any] = {"type": "yarn"}
    for k in YARN_KEYS:
        v = rs.get(k, _YARN_DEFAULTS.get(k))
        if v is not None:
            out[k] = v
    _check_yarn_mscale(out, source)
    return theta, out


def _check_yarn_mscale(rs: dict[str, Any], source: str) -> None:
    """Refuse YaRN settings on which DeepSeek-V3's reference code, its hub code and transformers disagree.

    With factor > 1, the reference scales the softmax by mscale(factor, m)^2 for one m; transformers and the
    hub code scale cos/sin by mscale(factor, mscale)/mscale(factor, mscale_all_dim) and the softmax by
    mscale(factor, mscale_all_dim)^2, except that transformers drops the ratio when either value is 0 or
    missing while the hub code does not.  They all agree when mscale == mscale_all_dim != 0, which is what
    every released DeepSeek checkpoint has.
    """
    factor = float(rs.get("factor", 1.0))
    if factor <= 1.0:
        return
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if not m or not m_all or not _same(m, m_all):
        raise ConfigError(
            f"{source}: rope_scaling.mscale={m!r}, rope_scaling.mscale_all_dim={m_all!r} is not supported: "
            "with factor > 1 both must be given, non-zero and equal (the DeepSeek-V3 reference has one "
            "mscale; transformers and DeepSeek's hub code disagree otherwise); see docs/checkpoints.md"
        )


def _check_routing(cfg: ModelConfig, source: str) -> None:
    """Refuse router settings whose meaning differs between DeepSeek-V3's code, transformers and moe_train."""
    if cfg.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ConfigError(
            f"{source}: topk_method={cfg.topk_method!r} is not supported: "
            "noaux_tc, greedy or group_limited_greedy"
        )
    if cfg.topk_method == "noaux_tc" and cfg.scoring_func != "sigmoid":
        raise ConfigError(
            f"{source}: topk_method=noaux_tc with scoring_func={cfg.scoring_func!r} is not supported: "
            "noaux_tc (the bias-corrected top-k) needs scoring_func=sigmoid"
        )
    if cfg.topk_method == "greedy" and cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        raise ConfigError(
            f"{source}: topk_method=greedy with n_group={cfg.n_group}, topk_group={cfg.topk_group} is "
            "ambiguous: DeepSeek's hub code ignores groups for greedy, its reference code limits them; set "
            "n_group=1, topk_group=1 (plain top-k) or topk_method=group_limited_greedy"
        )
    if cfg.num_experts_per_tok == 1 and cfg.norm_topk_prob:
        raise ConfigError(
            f"{source}: num_experts_per_tok=1 with norm_topk_prob=true is not supported: transformers and "
            "the DeepSeek-V3 reference normalise the single gate to 1, moe_train (like DeepSeek's hub code) "
            "keeps it un-normalised so the router still learns; set norm_topk_prob=false"
        )


def hf_config_to_model_config(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face DeepSeek-V3 config.json dict.

    Unknown fields and unsupported values raise ConfigError naming them; `source` prefixes the messages."""
    d = dict(d)
    model_type = d.get("model_type", "deepseek_v3")
    if model_type != "deepseek_v3":
        raise ConfigError(f"{source}: model_type={model_type!r} is not supported: deepseek_v3")
    if "num_mtp_layers" in d:
        alias = d.pop("num_mtp_layers")
        if "num_nextn_predict_layers" in d and d["num_nextn_predict_layers"] != alias:
            raise ConfigError(
                f"{source}: num_nextn_predict_layers={d['num_nextn_predict_layers']!r} and "
                f"num_mtp_layers={alias!r} disagree"
            )
        d["num_nextn_predict_layers"] = alias
    theta, scaling = _read_rope(d, source)

    head_dim = d.pop("head_dim", None)
    qk_head_dim = d.pop("qk_head_dim", None)
    for key, (allowed, what) in _FIXED.items():
        if key in d and d[key] not in allowed:
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported: {what}")
    known = set(_MAPPED) | {"rope_theta", "rope_scaling", "rope_parameters"} | _IGNORED | set(_FIXED)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"{source}: fields {unknown} are not supported by moe_train (remove them if they do not change "
            "the model's computation)"
        )

    values = {k: d.get(k, HF_DEFAULTS[k]) for k in _MAPPED}
    if values["num_key_value_heads"] != values["num_attention_heads"]:
        # MLA ignores it (so does transformers' sdpa path); its DeepseekV3Config defaults it to 128 whatever
        # the number of heads, so small models made with transformers carry a meaningless value
        values["num_key_value_heads"] = None
    for k in ("routed_scaling_factor", "rms_norm_eps", "initializer_range"):
        values[k] = float(values[k])
    cfg = ModelConfig(**values, rope_theta=theta, rope_scaling=scaling)
    if head_dim is not None and head_dim != cfg.qk_rope_head_dim:
        raise ConfigError(
            f"{source}: head_dim={head_dim!r} is not supported: qk_rope_head_dim={cfg.qk_rope_head_dim}"
        )
    if qk_head_dim is not None and qk_head_dim != cfg.qk_nope_head_dim + cfg.qk_rope_head_dim:
        raise ConfigError(
            f"{source}: qk_head_dim={qk_head_dim!r} is not qk_nope_head_dim + qk_rope_head_dim "
            f"= {cfg.qk_nope_head_dim + cfg.qk_rope_head_dim}"
        )
    validate_model(cfg, prefix=source)
    _check_routing(cfg, source)
    return cfg


def model_config_to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json in the hub spelling.

    Raises ConfigError for settings that other readers (transformers, DeepSeek's code) would compute
    differently from moe_train, so an export never silently changes what the model computes."""
    source = "model"
    validate_model(cfg, prefix=source)
    _check_routing(cfg, source)
    scaling = None
    if cfg.rope_scaling:
        rs = dict(cfg.rope_scaling)
        rs.pop("rope_type", None)
        rs.pop("type", None)
        scaling = {"type": "yarn", **{k: rs[k] for k in YARN_KEYS if k in rs}}
        for k, v in _YARN_DEFAULTS.items():
            scaling.setdefault(k, v)
        _check_yarn_mscale(scaling, source)
    out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    for k in _MAPPED:
        out[k] = getattr(cfg, k)
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = cfg.num_attention_heads
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = scaling
    out["attention_dropout"] = 0.0
    out["torch_dtype"] = torch_dtype
    return out


def shape_mismatches(found: ModelConfig, expected: ModelConfig) -> list[str]:
    """'field: checkpoint X vs model Y' for every shape-defining field that differs."""
    return [
        f"{k}: checkpoint {getattr(found, k)!r} vs model {getattr(expected, k)!r}"
        for k in SHAPE_FIELDS
        if getattr(found, k) != getattr(expected, k)
    ]


def math_mismatches(found: ModelConfig, expected: ModelConfig) -> list[str]:
    """Non-shape fields that change the computation (routing, rope, norms) and differ."""
    skip = set(SHAPE_FIELDS) | {"init_from", "initializer_range", "num_key_value_heads"}
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in skip:
            continue
        a, b = getattr(found, f.name), getattr(expected, f.name)
        if isinstance(a, dict) or isinstance(b, dict):
            differ = dict(a or {}) != dict(b or {})
        else:
            differ = not _same(a, b)
        if differ:
            out.append(f"{f.name}: checkpoint {a!r} vs model {b!r}")
    return out

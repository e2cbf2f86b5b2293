"""Start-up validation: the rules on values, and between keys, that need nothing from `parallel/`.

The rules that need the parallel machinery (schedules, mesh, dispatchers) are in
`moe_train.parallel.layout.check_layout`. Both run once, before any work (data, model, process groups)
starts, so a bad config costs the user seconds, not a queue slot. Each failure is a ConfigError naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields, is_dataclass
from typing import Any

from .schema import YARN_KEYS, ConfigError, ModelConfig, TrainConfig


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _positive(cfg: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is None or not v > 0:  # `not v > 0` also rejects NaN, which every comparison calls False
            _fail(f"{prefix}.{n}", v, "must be a positive number")


def _finite(obj: Any, prefix: str) -> None:
    """No float key may be NaN or infinite: range checks written as `v <= 0` or `v < lo` let NaN through,
    and an infinite lr or timeout is never what a user means."""
    for f in fields(obj):
        v, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(v):
            _finite(v, key + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            _fail(key, v, "a finite number")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, value, "one of " + ", ".join(allowed))


_MODEL_POSITIVE = (
    "hidden_size intermediate_size moe_intermediate_size num_hidden_layers num_attention_heads "
    "n_routed_experts num_experts_per_tok n_group topk_group kv_lora_rank qk_rope_head_dim v_head_dim "
    "max_position_embeddings rope_theta rms_norm_eps moe_layer_freq"
).split()


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    _positive(m, prefix, _MODEL_POSITIVE)
    if m.vocab_size is not None and m.vocab_size <= 0:
        _fail(
            f"{prefix}.vocab_size", m.vocab_size, "a positive number, or null to take it from the tokenizer"
        )
    for n in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "qk_nope_head_dim"):
        if getattr(m, n) < 0:
            _fail(f"{prefix}.{n}", getattr(m, n), "must be >= 0")
    if m.q_lora_rank is not None and m.q_lora_rank <= 0:
        _fail(f"{prefix}.q_lora_rank", m.q_lora_rank, "a positive number, or null for a full-rank query")
    if m.num_key_value_heads is not None and m.num_key_value_heads != m.num_attention_heads:
        _fail(
            f"{prefix}.num_key_value_heads",
            m.num_key_value_heads,
            f"null or num_attention_heads={m.num_attention_heads} "
            "(MLA gives every head its own key and value)",
        )
    if m.qk_rope_head_dim % 2:
        _fail(f"{prefix}.qk_rope_head_dim", m.qk_rope_head_dim, "an even number (RoPE rotates pairs)")
    if m.first_k_dense_replace > m.num_hidden_layers:
        _fail(
            f"{prefix}.first_k_dense_replace",
            m.first_k_dense_replace,
            f"at most num_hidden_layers={m.num_hidden_layers}",
        )
    _choice(f"{prefix}.scoring_func", m.scoring_func, ("sigmoid", "softmax"))
    _choice(f"{prefix}.topk_method", m.topk_method, ("noaux_tc", "greedy", "group_limited_greedy"))
    _choice(f"{prefix}.hidden_act", m.hidden_act, ("silu",))
    if m.n_routed_experts % m.n_group:
        _fail(
            f"{prefix}.n_routed_experts",
            m.n_routed_experts,
            f"must be divisible by n_group={m.n_group} (experts form equal groups)",
        )
    if m.topk_group > m.n_group:
        _fail(f"{prefix}.topk_group", m.topk_group, f"at most n_group={m.n_group}")
    per_group = m.n_routed_experts // m.n_group
    if m.num_experts_per_tok > m.topk_group * per_group:
        _fail(
            f"{prefix}.num_experts_per_tok",
            m.num_experts_per_tok,
            f"at most topk_group*experts_per_group={m.topk_group}*{per_group}={m.topk_group * per_group} "
            "(experts a token may reach)",
        )
    if m.n_group > 1 and per_group < 2 and m.scoring_func == "sigmoid":
        _fail(f"{prefix}.n_group", m.n_group, "groups of at least 2 experts (group score = sum of top-2)")
    if m.attention_bias:
        _fail(f"{prefix}.attention_bias", True, "false (DeepSeek-V3 attention has no biases)")
    if m.tie_word_embeddings:
        _fail(f"{prefix}.tie_word_embeddings", True, "false (DeepSeek-V3 keeps embedding and head untied)")
    if m.rope_scaling is not None:
        rs = dict(m.rope_scaling)
        kind = rs.get("type", rs.get("rope_type"))
        if kind not in ("yarn",):
            _fail(f"{prefix}.rope_scaling.type", kind, "yarn (or rope_scaling=null)")
        known = {"type", "rope_type", *YARN_KEYS}
        unknown = sorted(set(rs) - known)
        if unknown:
            _fail(f"{prefix}.rope_scaling", unknown, "keys among " + ", ".join(sorted(known)))
        if float(rs.get("factor", 1.0)) < 1.0:
            _fail(f"{prefix}.rope_scaling.factor", rs.get("factor"), ">= 1")


def _validate_deepspeed(cfg: TrainConfig) -> None:
    ds, t = cfg.deepspeed, cfg.trainer
    if cfg.optim.moments_dtype != "fp32":
        _fail(
            "optim.moments_dtype", cfg.optim.moments_dtype, "fp32 with optim.engine=deepspeed (its own Adam)"
        )
    if t.dtype == "fp8":
        _fail(
            "trainer.dtype",
            t.dtype,
            "auto, fp32, bf16 or bf16_master with optim.engine=deepspeed (FP8 GEMMs are the torch engine's; "
            "use optim.engine=torch for fp8)",
        )
    if ds.zero_stage not in (1, 2):
        _fail(
            "deepspeed.zero_stage",
            ds.zero_stage,
            "1 or 2 (stage 3 partitions parameters, which our pipeline stages and expert slices already do)",
        )
    _choice("deepspeed.offload_optimizer", ds.offload_optimizer, ("none", "cpu"))
    if ds.offload_optimizer == "cpu" and t.device == "cpu":
        _fail(
            "deepspeed.offload_optimizer",
            ds.offload_optimizer,
            "none when trainer.device=cpu (the optimizer state is already in host memory)",
        )
    if ds.overlap_comm and ds.zero_stage == 1:
        _fail("deepspeed.overlap_comm", True, "false with zero_stage=1 (DeepSpeed overlaps only in stage 2)")
    _positive(ds, "deepspeed", ["reduce_bucket_size", "allgather_bucket_size"])
    owned = {
        "train_batch_size": "data.batch_size",
        "train_micro_batch_size_per_gpu": "data.batch_size and parallel.microbatches",
        "gradient_accumulation_steps": "parallel.microbatches",
        "managed_gradient_accumulation": "nothing: moe_train runs its own backward passes",
        "gradient_allreduce_op": "nothing: losses are weighted by their share of the global batch",
        "gradient_clipping": "optim.grad_clip",
        "optimizer": "optim.*",
        "fp16": "trainer.dtype",
        "bf16": "trainer.dtype (bf16_master: bf16 parameters with ZeRO's fp32 masters)",
        "data_types": "trainer.dtype (bf16_master accumulates gradients in fp32)",
    }
    for key in sorted(set(ds.extra or {}) & set(owned)):
        _fail(
            f"deepspeed.extra.{key}", ds.extra[key], f"not settable here; moe_train sets it from {owned[key]}"
        )
    if t.skip_nonfinite and ds.zero_stage == 2:
        _fail(
            "trainer.skip_nonfinite",
            True,
            "false with deepspeed.zero_stage=2 (gradients are already reduced into ZeRO's partitions when "
            "the loss is known)",
        )


def validate(cfg: TrainConfig) -> None:
    """Check every key and the rules between keys that need nothing from `parallel/` (the layout's rules:
    `moe_train.parallel.layout.check_layout`); raise ConfigError naming key, value and what is allowed."""
    _finite(cfg, "")
    validate_model(cfg.model)
    d, o, b, t, p = cfg.data, cfg.optim, cfg.balance, cfg.trainer, cfg.parallel
    _choice("data.name", d.name, ("stdlib", "memmap", "synthetic", "mixture"))
    _positive(d, "data", ["seq_len", "batch_size"])
    if not 0.0 < d.val_fraction < 0.5:
        _fail("data.val_fraction", d.val_fraction, "between 0 and 0.5 (exclusive)")
    if d.seq_len > cfg.model.max_position_embeddings:
        _fail(
            "data.seq_len",
            d.seq_len,
            f"at most model.max_position_embeddings={cfg.model.max_position_embeddings}",
        )
    if d.name == "memmap":
        if not d.path:
            _fail(
                "data.path", d.path, "a directory with train.bin, val.bin and meta.json when data.name=memmap"
            )
        elif not os.path.isdir(d.path):
            _fail(
                "data.path", d.path, "an existing directory (build one with python -m moe_train.data.prepare)"
            )
    if d.tokenizer is not None and not os.path.isfile(d.tokenizer):
        _fail("data.tokenizer", d.tokenizer, "an existing tokenizer.json file, or null for bytes")
    if d.name == "synthetic":
        _positive(d, "data", ["synthetic_vocab", "synthetic_tokens"])
        if d.synthetic_doc_tokens < 0:
            _fail("data.synthetic_doc_tokens", d.synthetic_doc_tokens, ">= 0 (0: no documents)")
    if d.reset_positions and not d.document_mask:
        _fail(
            "data.reset_positions",
            True,
            "false or null when data.document_mask=false (positions restart "
            "where documents are masked apart)",
        )

    _choice("optim.engine", o.engine, ("torch", "deepspeed"))
    _choice("optim.decay", o.decay, ("cosine", "constant"))
    _positive(o, "optim", ["lr", "eps"])
    if o.warmup_steps < 0:
        _fail("optim.warmup_steps", o.warmup_steps, ">= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", o.min_lr_ratio, "between 0 and 1")
    for n in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, n) < 1.0:
            _fail(f"optim.{n}", getattr(o, n), "in [0, 1)")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, ">= 0")
    _choice("optim.moments_dtype", o.moments_dtype, ("fp32", "bf16"))
    if o.moments_dtype == "bf16" and o.beta2 > 1 - 2**-8:
        _fail(
            "optim.beta2",
            o.beta2,
            "at most 1 - 2^-8 (0.99609) with optim.moments_dtype=bf16: a smaller 1 - beta2 rounds the "
            "second moment's updates away in bf16",
        )
    if o.engine == "deepspeed":
        _validate_deepspeed(cfg)

    _choice("balance.mode", b.mode, ("aux_free", "aux_loss", "none"))
    for n in ("bias_update_rate", "seq_aux_alpha", "aux_loss_alpha"):
        if getattr(b, n) < 0:
            _fail(f"balance.{n}", getattr(b, n), ">= 0")
    if not 0.0 <= b.bias_update_stop_frac <= 1.0:
        _fail("balance.bias_update_stop_frac", b.bias_update_stop_frac, "between 0 and 1")
    if b.mode == "aux_free" and cfg.model.scoring_func != "sigmoid":
        _fail(
            "balance.mode",
            b.mode,
            "aux_free needs model.scoring_func=sigmoid (the bias shifts sigmoid scores)",
        )

    _positive(t, "trainer", ["max_steps", "log_every", "eval_every", "eval_sequences", "lease_timeout_s"])
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.dtype", t.dtype, ("auto", "fp32", "bf16", "bf16_master", "fp8"))
    _choice("trainer.recompute", t.recompute, ("none", "selective", "full"))
    _choice("trainer.compile", t.compile, ("auto", "none", "phases"))
    if t.ckpt_every < 0:
        _fail("trainer.ckpt_every", t.ckpt_every, ">= 0 (0: no checkpoints by step count)")
    if t.ckpt_every_minutes < 0:
        _fail("trainer.ckpt_every_minutes", t.ckpt_every_minutes, ">= 0 (0: no checkpoints by time)")
    if t.keep_last < 1:
        _fail("trainer.keep_last", t.keep_last, ">= 1")
    if t.mtp_weight < 0 or t.mtp_weight_final < 0:
        _fail("trainer.mtp_weight", (t.mtp_weight, t.mtp_weight_final), ">= 0")
    if not 0.0 <= t.mtp_weight_switch_frac <= 1.0:
        _fail("trainer.mtp_weight_switch_frac", t.mtp_weight_switch_frac, "between 0 and 1")
    if t.max_consecutive_skips < 1:
        _fail("trainer.max_consecutive_skips", t.max_consecutive_skips, ">= 1")
    if t.resume not in ("auto", "none") and not os.path.exists(t.resume):
        _fail("trainer.resume", t.resume, "auto, none, or an existing checkpoint directory")
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("trainer.device", t.device, "cpu or auto: CUDA is not available on this machine")

    _positive(p, "parallel", ["pp", "ep", "microbatches", "timeout_s"])
    if cfg.model.n_routed_experts % p.ep:
        _fail("parallel.ep", p.ep, f"a divisor of model.n_routed_experts={cfg.model.n_routed_experts}")
    if p.overlap_sm_carveout < 0:
        _fail("parallel.overlap_sm_carveout", p.overlap_sm_carveout, "an integer >= 0 (SMs left to NCCL)")
    if p.gpus_per_node is not None and p.gpus_per_node < 1:
        _fail("parallel.gpus_per_node", p.gpus_per_node, "a positive number, or null for LOCAL_WORLD_SIZE")
    if p.dispatch_bound is not None:
        if p.dispatcher not in ("bounded", "hierarchical_bounded", "direct"):
            _fail(
                "parallel.dispatch_bound",
                p.dispatch_bound,
                "null unless parallel.dispatcher=bounded, hierarchical_bounded or direct",
            )
        if not p.dispatch_bound > 0:
            _fail(
                "parallel.dispatch_bound", p.dispatch_bound, "a number > 0 (times the balanced load), or null"
            )

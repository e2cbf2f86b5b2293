"""Configuration schema, registration with Hydra's ConfigStore, and start-up validation.

The dataclasses are the single source of truth for every key: Hydra rejects unknown keys and wrong types
because the composed config is typed by them, and :func:`validate` checks the rules that tie several keys
together.  The rules that need the parallel machinery (schedules, mesh, dispatchers) are in
`moe_train.parallel.layout.check_layout`; this module imports nothing from `parallel/`.  Both run once,
before any work (data, model, process groups) starts, so a bad config costs the user seconds, not a queue
slot.

Model field names follow transformers' ``DeepseekV3Config`` so a Hugging Face ``config.json`` maps onto
``model`` one to one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the key, the value and what is allowed."""


@dataclass
class ModelConfig:
    # vocab_size None: taken from the data's tokenizer at start-up (257 for the byte tokenizer).
    vocab_size: int | None = None
    hidden_size: int = 128
    intermediate_size: int = 256
    moe_intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # HF field; MLA has no kv heads, kept for config.json round trips
    n_shared_experts: int = 1
    n_routed_experts: int = 16
    routed_scaling_factor: float = 1.0
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    q_lora_rank: int | None = 64
    kv_lora_rank: int = 64
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # YaRN: {type: yarn, factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
    #        mscale_all_dim}
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 1
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Start from Hugging Face DeepseekV3 weights (a directory with config.json + safetensors).
    init_from: str | None = None


@dataclass
class DataConfig:
    name: str = "stdlib"  # stdlib | memmap | synthetic | mixture
    tokenizer: str | None = None  # None: byte-level; else a tokenizers `tokenizer.json`
    path: str | None = None  # memmap: directory holding train.bin / val.bin / meta.json
    cache_dir: str | None = None  # None: $MOE_TRAIN_CACHE or ~/.cache/moe_train
    seq_len: int = 128
    batch_size: int = 32  # sequences per optimizer step (the global batch, whatever the layout)
    val_fraction: float = 0.05
    synthetic_vocab: int = 257
    synthetic_tokens: int = 1_000_000
    mixture: list[Any] = field(default_factory=list)  # mixture: [{name, path, weight}] (data/mixture.py)


@dataclass
class OptimConfig:
    engine: str = "torch"  # torch | deepspeed
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | constant
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # <= 0 disables clipping


@dataclass
class DeepSpeedSection:
    """`optim.engine=deepspeed`: the keys our generated DeepSpeed JSON takes (docs/configuration.md)."""

    zero_stage: int = 1  # 1 (optimizer states sharded) | 2 (+ gradients sharded; pp=1 only)
    offload_optimizer: str = "none"  # none | cpu (DeepSpeedCPUAdam on the host; CUDA only)
    reduce_bucket_size: int = 500_000_000  # elements per gradient-reduction bucket
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather bucket
    overlap_comm: bool = False  # stage 2: reduce buckets while backward still runs
    contiguous_gradients: bool = True
    # Any DeepSpeed key, merged over the generated JSON,
    # e.g. +deepspeed.extra.zero_optimization.round_robin_gradients=true
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BalanceConfig:
    mode: str = "aux_free"  # aux_free | aux_loss | none
    bias_update_rate: float = 1e-3  # gamma; DeepSeek-V3 uses 1e-3
    # gamma drops to 0 after this fraction of max_steps (DeepSeek-V3 freezes it for its last 500B tokens).
    bias_update_stop_frac: float = 1.0
    seq_aux_alpha: float = 1e-4  # complementary sequence-wise balance loss (0 disables)
    aux_loss_alpha: float = 1e-2  # classic batch-wise auxiliary loss, used only in mode=aux_loss


@dataclass
class TrainerConfig:
    max_steps: int = 300
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | fp32 | bf16
    log_every: int = 10
    eval_every: int = 100
    # validation sequences, rounded up to whole data.batch_size batches, each cut like a training step
    eval_sequences: int = 256
    ckpt_every: int = 0  # steps between checkpoints; 0: none by step count (the end always saves)
    ckpt_every_minutes: float = 30.0  # wall-clock minutes between checkpoints; 0: none by time
    resume: str = "auto"  # auto | none | path to a checkpoint directory or to one checkpoint
    keep_last: int = 2
    # The run dir's writer lease goes stale this long after its holder's last heartbeat (docs/checkpoints.md).
    lease_timeout_s: float = 60.0
    # write checkpoint shards in the background (committed at the next save or the end of the run)
    async_save: bool = False
    progress: bool = True
    mtp_weight: float = 0.3  # lambda; DeepSeek-V3: 0.3 then 0.1
    mtp_weight_final: float = 0.1
    mtp_weight_switch_frac: float = 0.7  # fraction of max_steps after which mtp_weight_final applies
    log_expert_load: bool = True  # per-layer load vectors in metrics.jsonl (for the load heatmap)
    profile: bool = False  # Chrome trace of a few steps into <run dir>/profile/
    recompute: str = "none"  # none | selective (norms, MLA up-projections, SwiGLU act) | full (blocks)
    # Peak dense bf16 TFLOP/s of one device for MFU; None: known GPUs (H100/H200: 989) or no MFU.
    peak_tflops: float | None = None
    # A non-finite loss skips the step (no update, counted in `skipped_steps`) instead of stopping the run.
    skip_nonfinite: bool = False
    # With skip_nonfinite: this many skipped steps in a row stop the run (exit 3): the weights themselves are
    # then likely non-finite, and every further step would be skipped too.
    max_consecutive_skips: int = 10


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"  # offline | online | disabled
    project: str = "moe_train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    console: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ParallelConfig:
    pp: int = 1
    ep: int = 1
    schedule: str = "1f1b"  # a key of parallel/pipeline/schedules.py's SCHEDULES
    dispatcher: str = "alltoall"  # a key of parallel/dispatch's DISPATCHERS
    gpus_per_node: int | None = None  # None: LOCAL_WORLD_SIZE
    overlap: bool = False
    # with overlap: SMs the matmuls leave to NCCL while an exchange is in flight (docs/performance.md)
    overlap_sm_carveout: int = 4
    # sum gradients over dp / expert-dp while backward still runs (torch engine, no pipeline schedule)
    overlap_grad_reduce: bool = True
    microbatches: int = 1  # micro-batches per optimizer step on each data-parallel rank
    virtual_stages: int = 2  # model chunks per rank, parallel.schedule=interleaved1f1b only
    stage_layers: list[int] | None = None
    backend: str | None = None  # None: nccl on cuda, gloo on cpu
    timeout_s: float = 600.0  # a collective waiting longer fails with the rank and the phase named


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str | None = None  # None: Hydra's run dir (or the working directory outside Hydra)


def register_configs() -> None:
    """Register the schema so `configs/train.yaml` can name it in its defaults list (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(overrides: list[str] | None = None, config_dir: str | None = None) -> DictConfig:
    """Compose the project config outside a Hydra app (tests, notebooks, bench scripts)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir or CONFIG_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides or []))
    return cfg


def to_object(cfg: DictConfig | TrainConfig) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- validation


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
        known = {
            "type",
            "rope_type",
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
        }
        unknown = sorted(set(rs) - known)
        if unknown:
            _fail(f"{prefix}.rope_scaling", unknown, "keys among " + ", ".join(sorted(known)))
        if float(rs.get("factor", 1.0)) < 1.0:
            _fail(f"{prefix}.rope_scaling.factor", rs.get("factor"), ">= 1")


def _validate_deepspeed(cfg: TrainConfig) -> None:
    ds, t = cfg.deepspeed, cfg.trainer
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
        "bf16": "trainer.dtype (weights stay fp32, compute runs under bf16 autocast)",
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
    _choice("trainer.dtype", t.dtype, ("auto", "fp32", "bf16"))
    _choice("trainer.recompute", t.recompute, ("none", "selective", "full"))
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


def resolved_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The fully resolved config as plain containers (for metrics, wandb and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


__all__ = [
    "MISSING",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "BalanceConfig",
    "TrainerConfig",
    "LoggerConfig",
    "WandbConfig",
    "ParallelConfig",
    "TrainConfig",
    "register_configs",
    "load_config",
    "to_object",
    "validate",
    "validate_model",
    "resolved_dict",
]

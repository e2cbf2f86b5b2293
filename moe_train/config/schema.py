"""The configuration schema and its registration with Hydra's ConfigStore.

The dataclasses are the single source of truth for every key: Hydra rejects unknown keys and wrong types
because the composed config is typed by them; the rules that tie values and keys together are in
`rules.py`.

Model field names follow transformers' ``DeepseekV3Config`` so a Hugging Face ``config.json`` maps onto
``model`` one to one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the key, the value and what is allowed."""


# YaRN's parameters in `model.rope_scaling` (besides its type): what validation and HF conversion accept
YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


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
    synthetic_doc_tokens: int = 0  # > 0: documents of about this many tokens, each ended by the last id
    mixture: list[Any] = field(default_factory=list)  # mixture: [{name, path, weight}] (data/mixture.py)
    # attention within each packed document, not across them (model/documents.py; synthetic data has none)
    document_mask: bool = True
    reset_positions: bool | None = None  # RoPE positions restart at each document; None: as document_mask


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
    moments_dtype: str = "fp32"  # fp32 | bf16: how AdamW stores exp_avg / exp_avg_sq (optim/adamw.py)


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
    # auto (cuda: bf16_master; cpu: fp32) | fp32 |
    # bf16 (autocast) | bf16_master (bf16 params, fp32 masters) | fp8 (bf16_master, dense linears in FP8)
    dtype: str = "auto"
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
    # none | phases: torch.compile each block's phase callables (model/compile.py); auto: phases on CUDA
    compile: str = "auto"
    # each micro-batch's forward and backward replayed from a CUDA graph (parallel/pipeline/graphed.py);
    # None: wherever the step qualifies (one CUDA process, one stage); true: an error where it does not
    cuda_graph: bool | None = None
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
    # bounded, hierarchical_bounded and direct dispatchers: buffers of this many times the balanced load;
    # null = the worst case (no overflow possible). A step that overflows runs again on the exact path
    # (parallel/dispatch/bounded.py)
    dispatch_bound: float | None = None
    # bounded, hierarchical_bounded and direct dispatchers: how their rows move — alltoall (equal-split
    # blocks, gloo and NCCL), peer_write (CUDA symmetric memory; the direct dispatcher's rows read in
    # place, dispatch/board.py), nvshmem (bounded ones, NVSHMEM), collective (the symmetric-memory paths
    # over the group's collectives: their CPU twin; dispatch/symm.py)
    dispatch_transport: str = "alltoall"
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


CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)


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


def resolved_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The fully resolved config as plain containers (for metrics, wandb and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]

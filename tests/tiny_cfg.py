"""Small configs the tests share: a 2-layer training config (seq 32, 8 sequences a step) and a toy model.

Small enough for several multi-process runs per test on 2 CPU cores; warmup short so the LR moves early.
"""

from __future__ import annotations

from moe_train.config import ModelConfig, TrainConfig, load_config, to_object


def tiny_cfg(run_dir: str, *overrides: str, steps: int) -> TrainConfig:
    cfg = to_object(
        load_config(
            [
                "data=synthetic",
                "data.synthetic_tokens=20000",
                "data.seq_len=32",
                "data.batch_size=8",
                "model.num_hidden_layers=2",
                f"trainer.max_steps={steps}",
                "trainer.log_every=1",
                "trainer.eval_every=1000",
                "trainer.eval_sequences=64",
                "trainer.progress=false",
                "logger.console=false",
                "optim.warmup_steps=2",
                *overrides,
            ]
        )
    )
    cfg.run_dir = run_dir
    return cfg


# The executor-level tests' model: every MLA and MoE path (q low rank, expert groups) at toy sizes.
TINY_MODEL = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=7,
    num_attention_heads=2,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)

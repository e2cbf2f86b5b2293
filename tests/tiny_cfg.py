"""The small training config the engine and checkpoint tests share: 2 layers, seq 32, 8 sequences a step.

Small enough for several multi-process runs per test on 2 CPU cores; warmup short so the LR moves early.
"""

from __future__ import annotations

from moe_train.config import TrainConfig, load_config, to_object


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
                "trainer.progress=false",
                "logger.console=false",
                "optim.warmup_steps=2",
                *overrides,
            ]
        )
    )
    cfg.run_dir = run_dir
    return cfg

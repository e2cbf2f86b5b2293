"""Learning-rate schedule: linear warmup, then cosine (or constant) decay to min_lr_ratio × lr."""

from __future__ import annotations

import math

from ..config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based). Warmup starts at lr/warmup so step 0 already learns."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

"""Optimizer engines. `torch`: AdamW with fp32 weights or masters, fp32 moments (fused on CUDA) or bf16 ones
(`optim.moments_dtype`, optim/adamw.py)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig
from .adamw import StoredMomentsAdamW
from .param_groups import split_decay
from .schedule import lr_at


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, params: dict[str, torch.Tensor] | None = None
) -> torch.optim.Optimizer:
    """AdamW over `params` (default: the model's parameters; fp32 masters under `trainer.dtype=bf16_master`),
    named like the model's parameters, which decide the decay groups."""
    decay, skip = split_decay(model)
    params = dict(model.named_parameters()) if params is None else params
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay, "names": decay},
        {"params": [params[n] for n in skip], "weight_decay": 0.0, "names": skip},
    ]
    hyper = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.moments_dtype == "bf16":
        return StoredMomentsAdamW(groups, torch.bfloat16, **hyper)
    on_cuda = all(p.is_cuda for p in params.values())
    return torch.optim.AdamW(groups, fused=True if on_cuda else None, **hyper)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


__all__ = ["build_optimizer", "lr_at", "set_lr", "split_decay"]

"""Single-device model math. Parallelism enters only through the MoE dispatcher seam and stage splitting."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .accounting import ParamCounts, count_params, train_flops_per_token
from .init import init_weights
from .moe import BalanceLoss, MoE, Router
from .recompute import set_recompute
from .stats import MoEStats, RouterRecord
from .transformer import ModelOutput, Transformer, is_moe_layer


def build_model(
    cfg: ModelConfig,
    balance: BalanceLoss | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    expert_slice: tuple[int, int] | None = None,
    layer_ids: list[int] | None = None,
    first: bool = True,
    last: bool = True,
) -> Transformer:
    """Build on `device` and initialise deterministically; device='meta' only builds the shapes.

    expert_slice=(first, count) builds only those routed experts (expert parallelism); layer_ids/first/last
    build one pipeline stage. Either way the values equal the same parameters of the whole model.
    """
    device = torch.device(device)
    with torch.device(device):
        model = Transformer(cfg, balance, expert_slice, layer_ids, first, last)
    if device.type != "meta":
        init_weights(model, seed, cfg.initializer_range)
    return model


def build_empty_model(
    cfg: ModelConfig,
    device: str | torch.device,
    dtype: torch.dtype,
    expert_slice: tuple[int, int] | None = None,
) -> Transformer:
    """Allocate the model on `device` in `dtype` without initialising it (weights are about to be loaded);
    expert_slice=(first, count): only those routed experts. `build_meta_model` then `allocate_model`."""
    return allocate_model(build_meta_model(cfg, dtype, expert_slice), device)


def build_meta_model(
    cfg: ModelConfig, dtype: torch.dtype, expert_slice: tuple[int, int] | None = None
) -> Transformer:
    """The model on the meta device in `dtype` (shapes only: no memory, no initialisation work), routers
    fp32 (their scores decide top-k, see docs/architecture.md). A loader may reshape it here (cut it for
    tensor-parallel decode) before any memory is allocated."""
    model = build_model(cfg, device="meta", expert_slice=expert_slice)
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.float()
    return model


def allocate_model(model: Transformer, device: str | torch.device) -> Transformer:
    """Memory on `device` for a meta model's parameters and buffers, uninitialised; the rotary tables are
    computed for real."""
    model.to_empty(device=torch.device(device))
    model.rotary.reset()
    return model


__all__ = [
    "allocate_model",
    "build_empty_model",
    "build_meta_model",
    "BalanceLoss",
    "MoE",
    "MoEStats",
    "ModelOutput",
    "ParamCounts",
    "RouterRecord",
    "Transformer",
    "build_model",
    "count_params",
    "init_weights",
    "is_moe_layer",
    "set_recompute",
    "train_flops_per_token",
]

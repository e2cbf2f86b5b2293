"""The DeepSpeed JSON generated from the `deepspeed:` group, and DeepSpeed's model-parallel-unit view of our
mesh."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

from ...config import DeepSpeedSection, OptimConfig
from ...parallel.mesh import Mesh


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_ds_config(
    ds: DeepSpeedSection,
    optim: OptimConfig,
    batch_size: int,
    dp: int,
    microbatches: int,
    device: torch.device,
    bf16_master: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: ZeRO and optimizer settings from our keys, then `deepspeed.extra`
    merged over it: any DeepSpeed key, e.g.
    `+deepspeed.extra.zero_optimization.round_robin_gradients=true`.

    bf16_master (`trainer.dtype=bf16_master`): DeepSpeed's bf16 mode, whose ZeRO optimizer keeps the fp32
    master partition; gradients accumulate over micro-batches in fp32 and are reduced in fp32, as the torch
    engine's masters are, so the two engines train the same model."""
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_scatter": True,
    }
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": [optim.beta1, optim.beta2],
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if device.type != "cuda" and ds.offload_optimizer == "none":
        params["torch_adam"] = True  # FusedAdam is a CUDA kernel; torch's AdamW on the CPU accelerator
    cfg: dict[str, Any] = {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // (dp * microbatches),
        "gradient_accumulation_steps": microbatches,
        "managed_gradient_accumulation": False,
        "gradient_allreduce_op": "sum",
        "gradient_clipping": optim.grad_clip if optim.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": params},
        "bf16": {"enabled": bf16_master},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16_master:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    return deep_merge(cfg, dict(ds.extra or {}))


class MeshMPU:
    """DeepSpeed's model-parallel-unit interface over our mesh: data parallel = dp of the stage. Model
    parallel is reported as size 1: DeepSpeed sums norms over its model-parallel group once per param
    group, and pipeline stages hold different param groups (a stage without MoE layers has no expert
    group), so that sum would pair unrelated collectives. The stage sum is added once instead
    (`internals.span_stages`)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._dp = mesh.group("dp") or dist.group.WORLD

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.layout.dp

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_model_parallel_group(self):
        return None

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

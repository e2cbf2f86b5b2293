"""`optim.engine=deepspeed`: DeepSpeed ZeRO (stage 1/2, optional CPU optimizer offload) under our own
forward/backward code, our mesh and our expert parameters.

How the pieces meet (docs/architecture.md, "DeepSpeed ZeRO", says why each choice was made):

- The engine is DeepSpeed's own `DeepSpeedEngine`, built from a JSON config generated from the `deepspeed:`
  group (written to `<run dir>/deepspeed_config.json`). Our executor and trainer call `backward` themselves
  (several micro-batches, B/W split, tensors rather than a scalar loss), so the engine runs with
  `managed_gradient_accumulation=false`: backward passes only accumulate `.grad`, and `engine.step()` is the
  accumulation boundary where ZeRO reduces (stage 1) or finalises (stage 2) the gradients — no micro-batch's
  gradient can fall outside a boundary.
- Groups come from our mesh through DeepSpeed's `mpu` interface: data parallel = our dp group of the stage;
  model parallel size 1 (see `MeshMPU`), the pipeline stages' norms added by
  `internals.span_stages`, which also takes the bf16 overflow flag over the stages.
- Experts follow DeepSpeed's MoE conventions without DeepSpeed's MoE layer: expert parameters carry
  `allreduce=False` and `group_name`, their expert-parallel and expert-data-parallel groups (our ep and edp
  groups) are registered under that name in DeepSpeed's group registry, and their optimizer param groups are
  marked `moe`. ZeRO then reduces and partitions expert gradients and moments over expert-dp only. The engine
  detects MoE from these parameter marks rather than from module classes (`internals.moe_engine_class`), so
  the model code stays free of parallelism.
- Every DeepSpeed attribute the adapter uses, private ones above all, is named in `internals.INTERNALS`,
  pinned to the DeepSpeed release it was written for by tests/test_deepspeed_internals.py.
- Gradients are summed, not averaged (`gradient_allreduce_op=sum`): our losses are already weighted by each
  micro-batch's share of the global batch. The clipping norm is DeepSpeed's per stage (copies other than the
  owner marked `ds_pipe_replicated`, experts summed over ep) with the stages' squares added: it equals the
  single-process norm.
"""

from __future__ import annotations

from .config import MeshMPU, build_ds_config, deep_merge
from .engine import MOMENT_KEYS, DeepSpeedZero, param_groups

__all__ = ["MOMENT_KEYS", "DeepSpeedZero", "MeshMPU", "build_ds_config", "deep_merge", "param_groups"]

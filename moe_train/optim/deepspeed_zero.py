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
  model parallel size 1 (see `MeshMPU`), the pipeline stages' norms added by `_global_norm_over_stages`.
- Experts follow DeepSpeed's MoE conventions without DeepSpeed's MoE layer: expert parameters carry
  `allreduce=False` and `group_name`, their expert-parallel and expert-data-parallel groups (our ep and edp
  groups) are registered under that name in DeepSpeed's group registry, and their optimizer param groups are
  marked `moe`. ZeRO then reduces and partitions expert gradients and moments over expert-dp only. The engine
  detects MoE from these parameter marks rather than from module classes (`_MoEEngine`), so the model code
  stays free of parallelism.
- Gradients are summed, not averaged (`gradient_allreduce_op=sum`): our losses are already weighted by each
  micro-batch's share of the global batch. The clipping norm is DeepSpeed's per stage (copies other than the
  owner marked `ds_pipe_replicated`, experts summed over ep) with the stages' squares added: it equals the
  single-process norm.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import DeepSpeedSection, OptimConfig
from ..parallel.expert import expert_param_names
from ..parallel.mesh import Mesh
from .param_groups import split_decay

#: the keys of DeepSpeed's Adam state that carry per-element moments (the rest are scalars like `step`)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


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
) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: ZeRO and optimizer settings from our keys, then `deepspeed.extra`
    merged over it: any DeepSpeed key, e.g.
    `+deepspeed.extra.zero_optimization.round_robin_gradients=true`."""
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
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, dict(ds.extra or {}))


class MeshMPU:
    """DeepSpeed's model-parallel-unit interface over our mesh: data parallel = dp of the stage. Model
    parallel is reported as size 1: DeepSpeed sums norms over its model-parallel group once per param
    group, and pipeline stages hold different param groups (a stage without MoE layers has no expert
    group), so that sum would pair unrelated collectives. The stage sum is added once instead
    (`_global_norm_over_stages`)."""

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


def _ensure_process_group(mesh: Mesh) -> None:
    """DeepSpeed needs torch.distributed even in one process: a world of one over a free local port.
    It also reads LOCAL_RANK, which only launchers set."""
    os.environ.setdefault("LOCAL_RANK", str(mesh.local_rank))
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if mesh.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _register_expert_groups(mesh: Mesh) -> str:
    """Name our ep/edp groups in DeepSpeed's registry the way its MoE layer would (`ep_size_<ep>`)."""
    from deepspeed.utils import groups as ds_groups

    name = f"ep_size_{mesh.layout.ep}"
    ep_ranks = next(g for g in mesh.layout.ep_groups() if mesh.rank in g)
    edp_ranks = next(g for g in mesh.layout.edp_groups() if mesh.rank in g)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = mesh.group("ep")
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = mesh.group("edp")
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks
    return name


def _engine_class():
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    class _MoEEngine(DeepSpeedEngine):
        """DeepSpeed recognises MoE only by its own `MoE` module class; ours is recognised by the DeepSpeed
        MoE marks on the expert parameters, which is what its ZeRO optimizer actually works from."""

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            if any(is_moe_param(p) for p in self.module.parameters()):
                self.has_moe_layers = True

    return _MoEEngine


def param_groups(model: nn.Module, optim: OptimConfig, moe_group: str | None) -> list[dict[str, Any]]:
    """Decay / no-decay groups, each split into dense and expert parts; expert parts are DeepSpeed MoE
    groups (`moe=True`, `name` = the expert group name). Empty groups are left out (ZeRO flattens each)."""
    decay, skip = split_decay(model)
    experts = expert_param_names(model) if moe_group else set()
    params = dict(model.named_parameters())
    groups = []
    for label, names, wd in (("decay", decay, optim.weight_decay), ("no_decay", skip, 0.0)):
        dense = [params[n] for n in names if n not in experts]
        expert = [params[n] for n in names if n in experts]
        if dense:
            groups.append({"params": dense, "weight_decay": wd, "name": f"dense_{label}"})
        if expert:
            groups.append({"params": expert, "weight_decay": wd, "name": moe_group, "moe": True})
    return groups


class DeepSpeedZero:
    """The trainer's optimizer engine backed by DeepSpeed ZeRO; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        ds: DeepSpeedSection,
        optim: OptimConfig,
        mesh: Mesh,
        batch_size: int,
        microbatches: int,
        owned: set[str] | None,
        run_dir: str | None,
    ) -> None:
        from deepspeed import comm as ds_dist
        from deepspeed.runtime.config import DeepSpeedConfig

        self.model = model
        self.mesh = mesh
        _ensure_process_group(mesh)
        self.config = build_ds_config(ds, optim, batch_size, mesh.layout.dp, microbatches, mesh.device)
        if run_dir and mesh.is_logging_rank:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "deepspeed_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config, f, indent=2)
        moe_group = None
        if mesh.layout.ep > 1:
            moe_group = _register_expert_groups(mesh)
            experts = expert_param_names(model)
            for name, p in model.named_parameters():
                if name in experts:
                    p.allreduce = False
                    p.group_name = moe_group
        for name, p in model.named_parameters():
            if owned is not None and name not in owned:
                p.ds_pipe_replicated = True  # a copy whose owner on another stage counts it
        mpu = MeshMPU(mesh)
        ds_dist.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)  # wraps ours
        config_class = DeepSpeedConfig(self.config, mpu)
        self.engine = _engine_class()(
            args=None,
            model=model,
            optimizer=None,
            model_parameters=param_groups(model, optim, moe_group),
            mpu=mpu,
            dist_init_required=False,
            config=self.config,
            config_class=config_class,
        )
        self.optimizer = self.engine.optimizer  # the ZeRO optimizer: param_groups, zero_grad, state
        if mesh.layout.pp > 1:
            _global_norm_over_stages(self.optimizer, mesh.group("pp"))

    # ------------------------------------------------------------------------------------ step
    def backward(self, loss: torch.Tensor) -> None:
        """A micro-batch's backward through DeepSpeed, so ZeRO-2's gradient hooks see its boundaries; the
        loss is already weighted by the micro-batch's share of the global batch (no gas scaling)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> float:
        """Reduce (over dp, experts over expert-dp), clip by the global norm, update; returns the norm."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------- state
    def named_state(self) -> dict[str, dict[str, Any]]:
        """Optimizer state keyed by parameter name, shaped like this rank's parameters (full over dp, this
        rank's expert slice), as the torch engine's state is: checkpoints move between engines and layouts.
        Collective over the dp / expert-dp groups."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._materialise_state()
        inner = self.optimizer.optimizer
        steps = [int(_step_of(inner.state.get(p, {}))) for g in inner.param_groups for p in g["params"]]
        step = max(steps) if steps else 0
        by_name: dict[str, dict[str, Any]] = {}
        for name, p in self.model.named_parameters():
            st: dict[str, Any] = {}
            for key in MOMENT_KEYS:
                val = safe_get_full_optimizer_state(p, key)
                if val is not None:  # one parameter's full moments at a time, parked in host memory
                    st[key] = val.detach().to("cpu", copy=True)
            if st:
                st["step"] = torch.tensor(float(step))
                by_name[name] = st
        return by_name

    def load_named_state(self, by_name: dict[str, dict[str, Any]], fit) -> None:
        """Set master weights from the (already loaded) model and moments from a name-keyed state."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._materialise_state()
        step = 0
        for name, p in self.model.named_parameters():
            safe_set_full_fp32_param(p, p.detach().float())
            saved = by_name.get(name)
            if not saved:
                continue
            for key in MOMENT_KEYS:
                if key in saved:
                    safe_set_full_optimizer_state(p, fit(name, saved[key]).float(), key)
            step = max(step, int(_step_of(saved)))
        inner = self.optimizer.optimizer
        for g in inner.param_groups:
            for p in g["params"]:
                st = inner.state.get(p)
                if st is not None and "step" in st:
                    st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else step

    def _materialise_state(self) -> None:
        """Make every parameter's view of the Adam moments valid.

        Adam creates its moments lazily at the first step, and DeepSpeed links each parameter to its slice
        of them once, right after stepping the *first* param group — so later groups' parameters stay linked
        to nothing. Moments are created here if no step ran yet (a resume), then every link is redone."""
        inner = self.optimizer.optimizer
        for g in inner.param_groups:
            for p in g["params"]:
                if not inner.state.get(p):
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state this rank holds: Adam moments ('dense', 'expert') and ZeRO's fp32 master
        partition ('master_dense', 'master_expert'; the torch engine has none, its weights are the master)."""
        out = {"dense": 0, "expert": 0, "master_dense": 0, "master_expert": 0}
        inner = self.optimizer.optimizer
        for g in inner.param_groups:
            kind = "expert" if g.get("moe") else "dense"
            for p in g["params"]:
                out[f"master_{kind}"] += p.numel() * p.element_size()
                for key in MOMENT_KEYS:
                    v = inner.state.get(p, {}).get(key)
                    if v is not None:
                        out[kind] += v.numel() * v.element_size()
        return out


def _global_norm_over_stages(zero_optimizer: Any, pp_group: Any) -> None:
    """Make the ZeRO optimizer's clipping norm global over pipeline stages: its own norm covers this
    stage (dp partitions summed, experts over ep, replicated copies skipped); the squares of the stages add.
    One collective per step on every rank, whatever param groups the stage holds."""
    stage_norm = zero_optimizer.scaled_global_norm

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        sq = stage_norm(norm_type).float() ** 2
        dist.all_reduce(sq, group=pp_group)
        return sq.sqrt()

    zero_optimizer.scaled_global_norm = scaled_global_norm


def _step_of(state: dict[str, Any]) -> float:
    s = state.get("step", 0)
    return float(s.item() if torch.is_tensor(s) else s)

"""ZeRO-Inference: weights held in CPU memory (or on NVMe) and streamed to the GPU layer by layer.

A model larger than the GPU still generates: DeepSpeed ZeRO stage 3 parameter offload keeps every weight in
pinned CPU memory (`offload_param.device=cpu`) or in files on an NVMe drive (`nvme`, through DeepSpeed's
async I/O op, which needs libaio), copies a layer's weights to the GPU just before the layer runs and frees
them right after.  There is no optimizer: `deepspeed.initialize` with a stage-3 config and no optimizer
builds only the parameter-offload part (`DeepSpeedZeRoOffload`).

How it meets our step (infer/forward.py): every `LayerStep` of the `InferenceModel` is marked a ZeRO-3 *leaf*
module, so calling it gathers all its layer's weights at once — the absorbed attention reads kv_b_proj's
weight directly and the looped experts index their weight tensors, neither of which a per-submodule hook
would see.  DeepSpeed records the order modules run in during the first step and then *prefetches*: while
layer i computes, the next layer's weights (`prefetch_layers` layers, as a parameter-count bucket) are
already being copied on a side stream.

The model is converted in place with `deepspeed.zero.Init(module=...)` before `deepspeed.initialize`: one
parameter at a time passes through the GPU on its way to its CPU (or NVMe) home, so the whole model never
needs to fit.  Buffers (the rotary tables, the routers' selection biases) are small and move to the GPU.
Decoding with offloaded weights runs the same kernels as without, so it produces the same tokens; it cannot
be captured in a CUDA graph (the hooks run host code every layer).

Routed experts are most of a MoE model's bytes, and a step at small batch uses few of them (batch 1: k of
n_experts per layer), so by default (`experts="chosen"`, offload to cpu) they do not go through DeepSpeed:
each MoE layer's experts are replaced by `ChosenExperts`, which keeps the fused expert tensors in pinned CPU
memory and, once the router has chosen, copies only the chosen experts (runs of consecutive ones as one
copy) into a device buffer all layers share (`ExpertStage`), then runs the same grouped GEMM over them. At
large batch nearly every expert is chosen and the copies stream the layer's experts at the link's rate.
DeepSpeed's ZeRO-Inference has no expert-aware fetch; NVMe offload keeps whole layers (`experts="layer"`),
since holding the experts in CPU memory is what NVMe offload exists to avoid.

Several GPUs (one process each, `torchrun`, no tensor or expert parallelism) decode their own prompts with
the weights spread over them: ZeRO-3 keeps 1/W of every parameter in each rank's CPU memory and gathers a
layer as W copies over the ranks' own PCIe links plus an all-gather between the GPUs, and `ChosenExperts`
does the same for the routed experts: each rank holds 1/W of every expert's rows, the layer fetches the
experts any rank chose (the union, one small all-reduce), each rank copies its slices of them, and an
all-gather assembles them on every GPU. Every forward is then a collective, whatever each rank's prompts:
`generate` keeps every rank stepping until all are done (`InferenceModel.collective`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.slices import index_runs
from ..model.moe import MoE, RoutedExperts
from ..model.transformer import Transformer
from ..ops.grouped_gemm import Taps, expert_swiglu
from .forward import InferenceModel

OFFLOAD_DEVICES = ("cpu", "nvme")
EXPERT_FETCH = ("auto", "chosen", "layer")
#: DeepSpeed's NVMe swapper moves tensors of at least this many bytes (swap_tensor/utils.py MIN_AIO_BYTES)
_MIN_AIO_BYTES = 1024**2


@dataclass(frozen=True)
class OffloadConfig:
    """device: where the weights live (cpu | nvme); nvme_path: a directory on the NVMe drive.

    prefetch_layers: layers gathered ahead of the one computing (0: no prefetch); pin_memory: page-locked
    CPU copies, which the GPU copies asynchronously and about twice as fast.
    """

    device: str = "cpu"
    nvme_path: str | None = None
    prefetch_layers: int = 1
    pin_memory: bool = True
    experts: str = "auto"  # chosen | layer | auto (chosen for cpu, layer for nvme): see the module docstring

    def __post_init__(self) -> None:
        if self.device not in OFFLOAD_DEVICES:
            raise ValueError(f"offload={self.device!r}: allowed values are {', '.join(OFFLOAD_DEVICES)}")
        if self.experts not in EXPERT_FETCH:
            raise ValueError(
                f"offload experts={self.experts!r}: allowed values are {', '.join(EXPERT_FETCH)}"
            )
        if self.device == "nvme" and self.experts == "chosen":
            raise ValueError(
                "offload=nvme with experts=chosen: fetching the chosen experts keeps the routed experts in "
                "CPU memory; use offload=cpu for it, or experts=layer"
            )
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("offload=nvme needs nvme_path: a directory on the NVMe drive for the weights")
        if self.prefetch_layers < 0:
            raise ValueError(f"prefetch_layers={self.prefetch_layers} must be >= 0")

    @property
    def chosen_experts(self) -> bool:
        return self.experts == "chosen" or (self.experts == "auto" and self.device == "cpu")


class ExpertStage:
    """The device buffers that the routed experts a layer chose are copied into, shared by every layer
    (layers run one after another on one stream), grown to the most experts any layer has chosen.
    `fetched` counts the experts copied, for the bench and the tests."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self.fetched = 0

    def buffer(self, name: str, n: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Room for `n` rows shaped `row_shape` under `name`, reused by every layer."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != row_shape or buf.dtype != dtype:
            self._buffers.pop(name, None)  # free the smaller one first
            buf = self._buffers[name] = torch.empty(n, *row_shape, dtype=dtype, device=self.device)
        return buf[:n]


class ChosenExperts(nn.Module):
    """A MoE layer's routed experts with their weights in (pinned) CPU memory: each call copies only the
    experts with rows (`counts` > 0) to the shared `ExpertStage` and runs the grouped GEMM over them. Rows
    arrive sorted by expert, so dropping the experts without rows keeps their order. Reads the chosen
    experts on the host (offload is never captured in a CUDA graph).

    group: the ranks the experts are spread over (None or one rank: this process holds them whole). Each
    rank then keeps rows [r·c, (r+1)·c) of every expert's two matrices (c = ⌈rows / W⌉, the last rank's
    zero-padded: row ranges, as a loader that reads only a rank's part would cut them), fetches them for
    the experts any rank chose and all-gathers the rest; an expert chosen elsewhere runs with no rows here."""

    weighs_rows = RoutedExperts.weighs_rows  # the same rule: it reads `impl` alone

    def __init__(
        self, experts: RoutedExperts, stage: ExpertStage, pin: bool, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.first_expert, self.num_local, self.impl = experts.first_expert, experts.num_local, experts.impl
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.shapes = (tuple(experts.gate_up_proj.shape[1:]), tuple(experts.down_proj.shape[1:]))
        host = []
        for w in (experts.gate_up_proj.detach(), experts.down_proj.detach()):
            if self.group is not None:  # this rank's rows of every expert's matrix, the last rank's padded
                world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
                rows = -(-w.shape[1] // world)
                w = w[:, rank * rows : (rank + 1) * rows]
                w = torch.nn.functional.pad(w, (0, 0, 0, rows - w.shape[1])).contiguous()
            host.append(w.pin_memory() if pin else w)
        # a tuple, so neither a parameter nor a buffer: DeepSpeed and `.to(device)` leave them where they are
        self.host = tuple(host)
        self.stage = stage

    def forward(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        gates: torch.Tensor | None = None,
        taps: Taps | None = None,
    ) -> torch.Tensor:
        chosen_mask = counts > 0
        if self.group is not None:  # the union over the ranks: every rank fetches the same experts
            chosen_mask = chosen_mask.to(torch.int32)
            dist.all_reduce(chosen_mask, dist.ReduceOp.MAX, group=self.group)
        chosen = chosen_mask.nonzero().flatten()
        ids = chosen.cpu()
        weights = [
            self._fetch(name, src, shape, ids)
            for name, src, shape in zip(("gate_up", "down"), self.host, self.shapes, strict=True)
        ]
        self.stage.fetched += len(ids)
        return expert_swiglu(x, counts[chosen], *weights, self.impl, taps=taps, gates=gates)

    def _fetch(self, name: str, src: torch.Tensor, shape: tuple[int, ...], ids: torch.Tensor) -> torch.Tensor:
        """Experts `ids` of the host tensor `src` on the device, whole ([n, *shape])."""
        n = len(ids)
        part = self.stage.buffer(name, n, tuple(src.shape[1:]), src.dtype)
        for start, at, length in index_runs(ids, torch.arange(n)):
            part[at : at + length].copy_(src[start : start + length], non_blocking=True)
        if self.group is None:
            return part
        world, rows, cols = dist.get_world_size(self.group), src.shape[1], src.shape[2]
        full = self.stage.buffer(name + " gathered", world * n, (rows, cols), src.dtype)
        dist.all_gather_into_tensor(full, part, group=self.group)
        return full.view(world, n, rows, cols).transpose(0, 1).reshape(n, world * rows, cols)[:, : shape[0]]


def fetch_chosen_experts(
    model: InferenceModel, device: torch.device, pin: bool, group: dist.ProcessGroup | None = None
) -> ExpertStage:
    """Replace every MoE layer's routed experts by `ChosenExperts` over one shared stage on `device`,
    spread over `group`'s ranks where it has several."""
    stage = ExpertStage(device)
    for step in model.layers:
        mlp = step.layer.mlp
        if isinstance(mlp, MoE) and isinstance(mlp.experts, RoutedExperts):
            mlp.experts = ChosenExperts(mlp.experts, stage, pin, group)
    return stage


def nvme_unavailable_reason() -> str | None:
    """Why NVMe offload cannot run here (DeepSpeed's async_io op, checked as `ds_report` does), or None."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return (
        "offload=nvme needs DeepSpeed's async_io op, which is not available here: libaio and its headers "
        "were not found (`ds_report` lists async_io as not compatible; install libaio-dev). "
        "offload=cpu works without it"
    )


def check_available(cfg: OffloadConfig) -> None:
    """Raise the reason `cfg` cannot run here (before any weights are loaded)."""
    if cfg.device == "nvme":
        reason = nvme_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)


def _layer_numels(model: InferenceModel) -> list[int]:
    return [sum(p.numel() for p in step.parameters()) for step in model.layers]


def nvme_dtype_problem(model: InferenceModel) -> str | None:
    """DeepSpeed's NVMe swapper holds one dtype (the model's); a large parameter in another one would be
    swapped as the wrong type.  The fp32 routers of big models (DeepSeek-V3: 256 × 7168) are such."""
    itemsize = model.dtype.itemsize
    bad = [
        name
        for name, p in model.named_parameters()
        if p.dtype != model.dtype and p.numel() * itemsize >= _MIN_AIO_BYTES
    ]
    if not bad:
        return None
    return (
        f"offload=nvme: DeepSpeed swaps parameters to NVMe in one dtype ({model.dtype}), but {bad[0]} "
        f"(and {len(bad) - 1} more) is {dict(model.named_parameters())[bad[0]].dtype}; use offload=cpu"
    )


def ds_config(model: InferenceModel, cfg: OffloadConfig) -> dict:
    """The DeepSpeed config: ZeRO stage 3 with parameter offload and layer-sized prefetch, no optimizer."""
    layer = max(_layer_numels(model))
    head = max(model.embed_tokens.weight.numel(), model.lm_head.weight.numel())
    offload: dict = {"device": cfg.device, "pin_memory": cfg.pin_memory}
    if cfg.device == "nvme":
        per_layer = max(len(list(step.parameters())) for step in model.layers)
        offload.update(
            nvme_path=cfg.nvme_path,
            # one swap buffer per parameter in flight, each as large as the largest parameter
            buffer_count=(1 + cfg.prefetch_layers) * per_layer + 2,
            buffer_size=max(p.numel() for p in model.parameters()),
        )
    zero = {
        "stage": 3,
        "offload_param": offload,
        "stage3_prefetch_bucket_size": cfg.prefetch_layers * layer,
        # the layer computing, the ones prefetched, and the embedding or the head
        "stage3_max_live_parameters": (1 + cfg.prefetch_layers) * layer + head,
        # parameters this small stay on the GPU: the norm weights, nothing with a matrix's size
        "stage3_param_persistence_threshold": model.cfg.hidden_size,
        # False: otherwise zero.Init replaces torch.nn.functional.linear process-wide
        "memory_efficient_linear": False,
    }
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}


def _process_group(device: torch.device) -> dist.ProcessGroup | None:
    """The ranks the weights are spread over: those of the process group already started (torchrun), or a
    world of one made here (ZeRO needs a process group; no ports: an in-memory store). None for one."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # zero.Init places gathered weights on the accelerator device named by LOCAL_RANK
    index = device.index if device.index is not None else 0
    os.environ.setdefault("LOCAL_RANK", str(index if device.type == "cuda" else 0))
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def offload_model(
    model: Transformer, cfg: OffloadConfig, device: str | torch.device = "cuda"
) -> InferenceModel:
    """An InferenceModel computing on `device` whose weights live where `cfg` says (the model must sit on
    the CPU; its parameters become DeepSpeed-managed in place). Under a process group of several ranks
    the weights are spread over them (the module docstring) and every rank must call the model alike."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_module

    device = torch.device(device)
    check_available(cfg)
    on = {p.device.type for p in model.parameters()}
    if on != {"cpu"}:
        raise ValueError(f"offload: load the model on the CPU first (its parameters are on {sorted(on)})")
    if device.type == "cuda" and deepspeed.get_accelerator().device_name() != "cuda":
        raise RuntimeError(
            f"offload to {device}: DeepSpeed selected its {deepspeed.get_accelerator().device_name()} "
            "accelerator (DS_ACCELERATOR overrides it)"
        )
    im = InferenceModel(model)
    if cfg.device == "nvme":
        problem = nvme_dtype_problem(im)
        if problem is not None:
            raise ValueError(problem)
    group = _process_group(device)
    if cfg.chosen_experts:  # before DeepSpeed sees the parameters: the experts stay out of ZeRO
        im.expert_stage = fetch_chosen_experts(im, device, cfg.pin_memory and device.type == "cuda", group)
    for step in im.layers:
        set_z3_leaf_module(step, True)
    for module in model.modules():  # buffers only: rotary tables, router biases
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", dist_init_required=False
    )
    config = ds_config(im, cfg)
    deepspeed.zero.Init(module=im, config_dict_or_path=config)
    engine, *_ = deepspeed.initialize(model=im, config=config)
    im.device, im.offload, im.collective = device, cfg.device, group
    im.ds_engine = (engine,)  # keeps the hooks' owner alive; a tuple, so not registered as a submodule
    return im

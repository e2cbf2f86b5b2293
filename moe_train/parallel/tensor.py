"""Tensor parallelism for inference: a whole model's weights cut across the ranks of a group, in place.

Applied after the model is built (`parallelize_for_decode`), as torchtitan's parallelize step is, so the
model code knows nothing of it. Every rank holds the same tokens; each computes a slice of every block and
the slices' partial sums are all-reduced:

- MLA: the heads are split. q_b_proj (q_proj without a query latent) and kv_b_proj keep their rows of this
  rank's heads, o_proj its columns; o_proj's output is summed over the group (one all-reduce per attention
  block). The latents — q_a_proj, kv_a_proj_with_mqa and their norms — stay whole on every rank, and so does
  the latent cache: at 576 values a token per layer it is cheaper to keep than to split, and splitting it
  would need the heads' keys rebuilt per rank, which the absorbed decode path avoids.
- SwiGLU (dense layers, shared experts) and the routed experts: each keeps 1/size of every intermediate
  dimension — gate and up rows, down columns — so a rank reads 1/size of the weights of the experts the
  router chose. The dense MLP's down_proj output is all-reduced; in a MoE block the shared and the routed
  experts' outputs are each all-reduced (the routed ones after the gate-weighted combine, on token rows).
- The embedding, the router, the norms and the LM head stay whole: every rank routes identically because
  all-reduce hands every rank the same sum.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model.attention import MLA
from ..model.dispatch import LocalDispatcher, LocalPlan
from ..model.mlp import SwiGLU
from ..model.moe import MoE


class ReducedLocalDispatcher(LocalDispatcher):
    """All experts on this rank, each holding a slice of its intermediate dimension: the combined rows are
    partial sums, completed by one all-reduce over the group."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group = group

    def combine_wait(self, plan: LocalPlan, handle: torch.Tensor) -> Generator[Any, Any, torch.Tensor]:
        out = yield from super().combine_wait(plan, handle)
        dist.all_reduce(out, group=self.group)
        return out


def _reduce_output(group: Any):
    def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)
        return out

    return hook


def _keep(param: nn.Parameter, dim: int, index: torch.Tensor) -> None:
    """Replace param's data by its entries at `index` along `dim` (a copy: the whole tensor is freed)."""
    param.data = param.data.index_select(dim, index.to(param.device)).contiguous()


def _blocks(n_blocks: int, size: int, rank: int, block: int) -> torch.Tensor:
    """Indices of this rank's n_blocks/size consecutive blocks of `block` rows each."""
    if n_blocks % size:
        raise ValueError(f"{n_blocks} cannot be split evenly over {size} ranks")
    per = n_blocks // size
    return torch.arange(rank * per * block, (rank + 1) * per * block)


def _split_swiglu(mlp: SwiGLU, group: Any, size: int, rank: int) -> None:
    inner = _blocks(mlp.gate_proj.out_features, size, rank, 1)
    for proj in (mlp.gate_proj, mlp.up_proj):
        _keep(proj.weight, 0, inner)
        proj.out_features = len(inner)
    _keep(mlp.down_proj.weight, 1, inner)
    mlp.down_proj.in_features = len(inner)
    mlp.down_proj.register_forward_hook(_reduce_output(group))


def _split_attention(attn: MLA, group: Any, size: int, rank: int) -> None:
    n = attn.n_heads
    q = attn.q_b_proj if attn.q_lora_rank else attn.q_proj
    _keep(q.weight, 0, _blocks(n, size, rank, attn.qk_head_dim))
    _keep(attn.kv_b_proj.weight, 0, _blocks(n, size, rank, attn.nope + attn.v_head_dim))
    _keep(attn.o_proj.weight, 1, _blocks(n, size, rank, attn.v_head_dim))
    attn.n_heads = n // size
    q.out_features = q.weight.shape[0]
    attn.kv_b_proj.out_features = attn.kv_b_proj.weight.shape[0]
    attn.o_proj.in_features = attn.o_proj.weight.shape[1]
    attn.o_proj.register_forward_hook(_reduce_output(group))


def _split_moe(moe: MoE, group: Any, size: int, rank: int) -> None:
    experts = moe.experts
    inter = experts.down_proj.shape[2]
    inner = _blocks(inter, size, rank, 1)
    _keep(experts.gate_up_proj, 1, torch.cat([inner, inter + inner]))  # its gate rows, then its up rows
    _keep(experts.down_proj, 2, inner)
    moe.dispatcher = ReducedLocalDispatcher(group)
    if moe.shared_experts is not None:
        _split_swiglu(moe.shared_experts, group, size, rank)


def join_decode_group(device: str) -> str:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise) and return this rank's
    device: cuda:LOCAL_RANK on CUDA."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def parallelize_for_decode(model: nn.Module, group: Any = None) -> None:
    """Cut `model` (a whole Transformer, or the InferenceModel over one) for tensor-parallel inference over
    `group` (None: the default group), in place; see the module docstring for what is split."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return
    modules = list(model.modules())
    shared = {id(m.shared_experts) for m in modules if isinstance(m, MoE)}
    for m in modules:
        if isinstance(m, MLA):
            _split_attention(m, group, size, rank)
        elif isinstance(m, MoE):
            _split_moe(m, group, size, rank)
        elif isinstance(m, SwiGLU) and id(m) not in shared:  # a dense layer's MLP
            _split_swiglu(m, group, size, rank)

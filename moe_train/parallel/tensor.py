"""Tensor and expert parallelism for inference: a whole model's weights cut across ranks, in place.

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
  router chose. The dense MLP's down_proj output is all-reduced. In a MoE block the shared and the routed
  experts' partial rows are added first and all-reduced once, in the block's finish (`DecoderLayer.finish`,
  the composition phase: the residual is added to the sum, as in one process), so a MoE block costs one
  all-reduce, as a dense one does.
- The LM head: each rank keeps ceil(vocab/size) of its rows (the last rank's padded with zeros) and the
  logits are all-gathered, so a decode step reads 1/size of the head on each rank.
- The embedding (one row read a token), the router and the norms stay whole: every rank routes identically
  because all-reduce hands every rank the same sum.

With expert parallelism (ep > 1; world = tp × ep, rank = ep_rank · tp + tp_rank) the routed experts are
also cut by expert: an ep rank holds n_experts/ep whole experts (each still cut over its tp group) and runs
only the token slots routed to them. Attention and dense MLPs are cut over the tp group alone (ep ranks repeat
them); the shared experts are cut over every rank, so that their partial rows and the routed ones are summed
by the same all-reduce over the world. The tokens are the same on every rank, so no token moves: the
all-to-all of training is replaced by the one all-reduce. Which slots are local is found on the device, in a
buffer of fixed size (`ExpertSliceDispatcher`), so nothing is read on the host and the decode step of every
rank can be captured in a CUDA graph.

Loading (`load_for_decode`) cuts first: the model is built on the meta device with only this rank's experts,
cut by the same code (`cut_for_decode`, which records what each cut parameter keeps of its whole tensor),
allocated, and then only those parts are read from the checkpoint (checkpoint/slices.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import resolve_checkpoint
from ..checkpoint.slices import TensorSlice
from ..hf.convert import as_dtype
from ..infer.forward import InferenceModel, as_inference_model
from ..infer.load import Loaded, generation_config, is_hf_dir, read_weights, tokenizer_of
from ..model import allocate_model, build_meta_model
from ..model.attention import MLA
from ..model.dispatch import LocalDispatcher
from ..model.mlp import SwiGLU
from ..model.moe import MoE
from ..model.phases import Program, done
from ..model.transformer import DecoderLayer, Transformer
from .dispatch.bounded import bounded_slots
from .dispatch.rows import Slots, expand_to_slots, slot_meta, slot_sums


@dataclass
class SlicePlan:
    topk_idx: torch.Tensor  # (tokens, k) the routed experts
    slots: Slots | None = None  # the slots of this rank's experts, in a fixed-size buffer, once dispatched


class ExpertSliceDispatcher:
    """Experts [first, first + num_local) on this rank, the tokens on every rank: each rank runs the slots
    routed to its experts; its rows, gate-weighted by the experts, are a partial sum, which the block's
    finish completes over every rank (see the module docstring).

    Nothing is read on the host, so a decode step with it can be captured in a CUDA graph: the local slots
    are sorted as the bounded dispatcher's receiver sorts them (`dispatch.bounded.bounded_slots`), into a
    buffer of the worst case (`tokens · min(k, num_local)` rows, plus one padding row) with rows per expert
    counted on the device; the grouped GEMM computes only the counted rows, and each token's sum leaves the
    other ranks' slots out."""

    serves_expert_slice = True  # InferenceModel accepts a model holding only some experts behind it

    def __init__(self, first: int, num_local: int) -> None:
        if first % num_local:
            raise ValueError(f"expert slice starting at {first} is not a whole slice of {num_local} experts")
        self.first, self.num_local = first, num_local

    def plan(self, topk_idx: torch.Tensor, n_experts: int) -> Program:
        return done(SlicePlan(topk_idx))

    def dispatch_start(self, plan: SlicePlan, x: torch.Tensor, topk_weight: torch.Tensor) -> Program:
        n, k = plan.topk_idx.shape
        meta = slot_meta(plan.topk_idx, topk_weight.float())  # fp32: expert ids exact
        plan.slots, _ = bounded_slots(meta, self.first, self.num_local, n * min(k, self.num_local))
        return done(expand_to_slots(x, plan.slots))  # the worst case: it never overflows

    def dispatch_wait(self, plan: SlicePlan, handle: torch.Tensor) -> Program:
        assert plan.slots is not None
        return done((handle, plan.slots.local_counts, plan.slots.gates))

    def combine_start(self, plan: SlicePlan, y: torch.Tensor, gates: torch.Tensor | None = None) -> Program:
        return done((y, gates))

    def combine_wait(self, plan: SlicePlan, handle: tuple[torch.Tensor, torch.Tensor | None]) -> Program:
        """Σ (gate·)row per token over the local slots (fp32 inside): this rank's part of the routed rows."""
        assert plan.slots is not None
        y, gates = handle
        return done(slot_sums(y, plan.slots, gates))


def _reduce_output(group: Any) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)
        return out

    return hook


class _Cuts:
    """Cuts parameters in place and records, per parameter, what it then holds of its whole tensor (what a
    loader reads into a model cut before its weights are loaded)."""

    def __init__(self) -> None:
        self.held: dict[int, TensorSlice] = {}

    def keep(self, param: nn.Parameter, dim: int, index: torch.Tensor) -> None:
        """Replace param's data by its entries at `index` along `dim` (a copy: the whole tensor is freed)."""
        param.data = param.data.index_select(dim, index.to(param.device)).contiguous()
        self.held[id(param)] = self.held.get(id(param), TensorSlice()).cut(dim, index)

    def pad_rows(self, param: nn.Parameter, count: int) -> None:
        """Append `count` zero rows to param."""
        w = param.data
        param.data = torch.cat([w, w.new_zeros(count, *w.shape[1:])])
        self.held[id(param)] = self.held.get(id(param), TensorSlice()).padded(0, count)


def _blocks(n_blocks: int, size: int, rank: int, block: int) -> torch.Tensor:
    """Indices of this rank's n_blocks/size consecutive blocks of `block` rows each."""
    if n_blocks % size:
        raise ValueError(f"{n_blocks} cannot be split evenly over {size} ranks")
    per = n_blocks // size
    return torch.arange(rank * per * block, (rank + 1) * per * block)


def _split_swiglu(mlp: SwiGLU, cuts: _Cuts, group: Any, size: int, rank: int, reduce: bool = True) -> None:
    """Keep this rank's slice of the intermediate dimension; `reduce`: all-reduce down_proj's output over
    `group` (None: the world), else the caller sums the partial rows itself."""
    inner = _blocks(mlp.gate_proj.out_features, size, rank, 1)
    for proj in (mlp.gate_proj, mlp.up_proj):
        cuts.keep(proj.weight, 0, inner)
        proj.out_features = len(inner)
    cuts.keep(mlp.down_proj.weight, 1, inner)
    mlp.down_proj.in_features = len(inner)
    if reduce:
        mlp.down_proj.register_forward_hook(_reduce_output(group))


def _split_attention(attn: MLA, cuts: _Cuts, group: Any, size: int, rank: int) -> None:
    n = attn.n_heads
    q = attn.q_b_proj if attn.q_lora_rank else attn.q_proj
    cuts.keep(q.weight, 0, _blocks(n, size, rank, attn.qk_head_dim))
    cuts.keep(attn.kv_b_proj.weight, 0, _blocks(n, size, rank, attn.nope + attn.v_head_dim))
    cuts.keep(attn.o_proj.weight, 1, _blocks(n, size, rank, attn.v_head_dim))
    attn.n_heads = n // size
    q.out_features = q.weight.shape[0]
    attn.kv_b_proj.out_features = attn.kv_b_proj.weight.shape[0]
    attn.o_proj.in_features = attn.o_proj.weight.shape[1]
    attn.o_proj.register_forward_hook(_reduce_output(group))


def _split_head(head: nn.Linear, cuts: _Cuts, group: Any, size: int, rank: int) -> None:
    vocab = head.out_features
    per = -(-vocab // size)
    rows = torch.arange(rank * per, min(vocab, (rank + 1) * per))
    cuts.keep(head.weight, 0, rows)
    cuts.pad_rows(head.weight, per - len(rows))  # equal parts to gather
    head.out_features = per

    def gather(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(out) for _ in range(size)]
        dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts, dim=-1)[..., :vocab]

    head.register_forward_hook(gather)


def _split_moe(moe: MoE, cuts: _Cuts, tp: Any, ep: tuple[int, int]) -> None:
    """Routed experts: this ep rank's experts (ep = (rank, size)), each cut over the tp group; shared experts
    cut over every rank. Both leave partial rows, which `_reduce_finish` sums."""
    experts = moe.experts
    ep_rank, ep_size = ep
    if ep_size > 1:
        first, count = decode_expert_slice(moe.n_experts, ep_size, ep_rank)
        if experts.num_local == moe.n_experts:
            local = torch.arange(first, first + count)
            cuts.keep(experts.gate_up_proj, 0, local)
            cuts.keep(experts.down_proj, 0, local)
            experts.first_expert, experts.num_local = first, count
        elif (experts.first_expert, experts.num_local) != (first, count):
            raise ValueError(
                f"rank {dist.get_rank()} holds experts {experts.first_expert}..+{experts.num_local}, "
                f"not its ep slice {first}..+{count} (load with expert_slice=decode_expert_slice(...))"
            )
    size, rank = dist.get_world_size(tp), dist.get_rank(tp)
    if size > 1:
        inter = experts.down_proj.shape[2]
        inner = _blocks(inter, size, rank, 1)
        # its gate rows, then its up rows
        cuts.keep(experts.gate_up_proj, 1, torch.cat([inner, inter + inner]))
        cuts.keep(experts.down_proj, 2, inner)
    if ep_size > 1:
        moe.dispatcher = ExpertSliceDispatcher(experts.first_expert, experts.num_local)
    else:
        moe.dispatcher = LocalDispatcher()  # every expert here, each a slice: partial rows
    if moe.shared_experts is not None:
        _split_swiglu(moe.shared_experts, cuts, None, dist.get_world_size(), dist.get_rank(), reduce=False)


def _reduce_finish(layer: DecoderLayer) -> None:
    """The MoE block's finish with its routed and shared rows, partial sums on every rank, summed by one
    all-reduce over the world before the block's own finish adds them to the residual."""
    finish = layer.finish

    def reduced(h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        rows = MoE.output(routed, shared)
        dist.all_reduce(rows)
        return finish(h, rows, None)

    layer.finish = reduced


def join_decode_group(device: str) -> str:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise) and return this rank's
    device: cuda:LOCAL_RANK on CUDA."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def decode_expert_slice(n_experts: int, ep: int, ep_rank: int | None = None) -> tuple[int, int]:
    """(first, count): the routed experts ep rank `ep_rank` (default: this process's, with rank =
    ep_rank · tp + tp_rank) holds; what to load with `load_for_inference(expert_slice=...)`."""
    if ep_rank is None:
        ep_rank = dist.get_rank() // (dist.get_world_size() // ep)
    local = _blocks(n_experts, ep, ep_rank, 1)
    return int(local[0]), len(local)


def _tp_group(tp: int, ep: int) -> Any:
    """This rank's tp group (ranks ep_rank·tp … ep_rank·tp + tp − 1); None: the whole world."""
    if ep == 1:
        return None
    mine = None
    for e in range(ep):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(e * tp, (e + 1) * tp)))
        if dist.get_rank() // tp == e:
            mine = g
    return mine


def cut_for_decode(model: Transformer | InferenceModel, ep: int = 1) -> dict[str, TensorSlice]:
    """Cut `model` in place over every rank of the default process group: experts over `ep` ranks, everything
    else (and each expert) over tp = world / ep; returns, by parameter name, what each cut parameter now holds
    of its whole tensor (the experts of a model built with only this rank's `decode_expert_slice` count as
    whole). Works on a meta-device model: a loader cuts first, then reads only those slices. A process without
    a process group is a world of one: nothing is cut."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if ep < 1 or world % ep:
        raise ValueError(f"ep={ep} must divide the number of processes ({world})")
    if world == 1:
        return {}
    cuts = _Cuts()
    tp = world // ep
    group = _tp_group(tp, ep)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    modules = list(model.modules())
    shared = {id(m.shared_experts) for m in modules if isinstance(m, MoE)}
    for m in modules:
        if isinstance(m, MLA):
            if size > 1:
                _split_attention(m, cuts, group, size, rank)
        elif isinstance(m, MoE):
            _split_moe(m, cuts, group, (dist.get_rank() // tp, ep))
        elif isinstance(m, DecoderLayer) and isinstance(m.mlp, MoE):
            _reduce_finish(m)
        elif isinstance(m, SwiGLU) and id(m) not in shared and size > 1:  # a dense layer's MLP
            _split_swiglu(m, cuts, group, size, rank)
    if size > 1:
        _split_head(model.lm_head, cuts, group, size, rank)
    return {n: cuts.held[id(p)] for n, p in model.named_parameters() if id(p) in cuts.held}


def load_for_decode(
    path: str,
    ep: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: str | None = None,
) -> Loaded:
    """`load_for_inference` split over every rank of the default process group (`cut_for_decode`): the model
    is built on the meta device and cut first, then only the parts each rank keeps are allocated and read
    (safetensors slices, DCP read items narrowed to them, views of a memory-mapped model.pt), so no rank
    reads or holds the whole model. `model` is the InferenceModel to decode with."""
    source = path if is_hf_dir(path) else resolve_checkpoint(path)
    cfg = generation_config(source)
    experts = decode_expert_slice(cfg.n_routed_experts, ep) if ep > 1 else None
    model = build_meta_model(cfg, as_dtype(dtype) or torch.float32, experts)
    slices = cut_for_decode(model, ep)
    read_weights(allocate_model(model, device), source, slices)
    return Loaded(as_inference_model(model.eval()), tokenizer_of(source, tokenizer), source)


def parallelize_for_decode(model: Transformer | InferenceModel, ep: int = 1) -> InferenceModel:
    """Cut a loaded `model` for inference over every rank of the default process group (`cut_for_decode`),
    in place; returns the InferenceModel over it. A model loaded with only this rank's experts
    (`decode_expert_slice`) is taken as it is. `load_for_decode` cuts before loading instead, and reads
    only what each rank keeps."""
    cut_for_decode(model, ep)
    return as_inference_model(model)

"""A per-rank memory estimate printed at start-up: model state plus activations of in-flight micro-batches,
and what evaluation (a forward of one micro-batch without backward) needs.

This is arithmetic, not a measurement. Model state is exact for the parameters this rank holds (its partial
model under pipeline/expert parallelism): fp32 weights and gradients and AdamW's two fp32 moments, 16
bytes/param unless the optimizer engine shards or offloads some of it (`StateSharding`), plus 2 bytes/param
for bf16 copies of the weights when bf16 autocast is on (autocast casts each weight once per region and the
casts are saved for backward). With fp32 master weights (`trainer.dtype=bf16_master`) the parameters are
bf16 (2 bytes) beside a 4-byte fp32 master, 4-byte fp32 gradients and the moments: 18 bytes/param, with no
autocast copy (the few fp32 parameters, routers and norm gains, are counted like the rest); bf16 moments
(`optim.moments_dtype=bf16`) take 4 bytes off either. Activations count, per token
and layer, the tensors autograd saves for backward (docs/parallelism.md, "Memory per rank"); they leave out
the allocator's fragmentation, temporaries of the op being run, communication buffers and the T×T attention
matrix (a fused/flash attention keeps none; CPU's math attention does). Under `trainer.dtype=fp8` the routed
experts' saved tensors are FP8 tiles (1 byte a value plus a 4-byte scale per 128).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from ..config import ModelConfig
from ..ops.cross_entropy import CHUNK_ELEMENTS
from ..ops.fp8 import TILE, fp8_eligible
from .transformer import is_moe_layer

GIB = 1024**3
FP32 = 4


def _norm(d: int, a: int, mode: str) -> int:
    """RMSNorm saves its input and an fp32 normalised copy; selective recomputation drops the copy."""
    return a * d + (0 if mode == "selective" else FP32 * d)


def attention_bytes(c: ModelConfig, a: int, mode: str) -> int:
    """Bytes saved per token by one block's input norm and MLA (a = activation bytes per element)."""
    n, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    total = _norm(c.hidden_size, a, mode) + a * c.hidden_size  # input norm, its output (q_a / kv_a input)
    if c.q_lora_rank:
        # q latent -> latent norm -> q_b_proj; selective keeps only the latent (the up-projection region's
        # input), not the norm's fp32 copy and output.
        r = c.q_lora_rank
        total += a * r if mode == "selective" else a * r + FP32 * r + a * r
    r = c.kv_lora_rank
    total += a * c.qk_rope_head_dim + (a * r if mode == "selective" else a * r + FP32 * r + a * r)
    # q and k after rope/cat, v, the attention output (+ fp32 logsumexp) and its reshaped copy for o_proj
    total += a * n * (2 * qk + 3 * c.v_head_dim) + FP32 * n
    return total


def _swiglu(h: int, inner: int, a: int, mode: str, input_saved: bool) -> int:
    """gate and up outputs, silu(gate) (dropped by selective recomputation), their product (down's input)."""
    return (0 if input_saved else a * h) + a * inner * (3 if mode == "selective" else 4)


def _fp8_tiles(n: int) -> int:
    """Bytes of n values kept as FP8 tiles: one E4M3 byte each and an fp32 scale per 128."""
    return n + FP32 * (n // TILE)


def mlp_bytes(
    c: ModelConfig, layer: int, a: int, mode: str, fp8: bool = False, routed: float | None = None
) -> int:
    """Bytes saved per token by one block's post-attention norm and its dense MLP or MoE. fp8
    (`trainer.dtype=fp8`): routed experts that tile by 128 keep their row, their SwiGLU input and the down
    projection's input as FP8 tiles (ops/fp8.py) and recompute silu(gate)·up. routed: expert rows a MoE
    layer keeps per token of this rank (None: its k slots; a dispatcher with fixed-size buffers keeps its
    buffer's rows, parallel/dispatch/bounded.py)."""
    h = c.hidden_size
    total = _norm(h, a, mode) + a * h  # post-attention norm and its output (the MLP's input)
    if not is_moe_layer(c, layer):
        return total + _swiglu(h, c.intermediate_size, a, mode, input_saved=True)
    k, inner = (c.num_experts_per_tok if routed is None else routed), c.moe_intermediate_size
    total += FP32 * (h + c.n_routed_experts)  # router: fp32 input copy and the scores
    # k routed rows per token: the dispatched row, the expert SwiGLU, the expert output (weighted in combine)
    if fp8 and fp8_eligible(h, inner):
        # row; gate, up; down's input; output
        total += int(k * (_fp8_tiles(h) + 3 * _fp8_tiles(inner) + a * h))
    else:
        total += int(k * (_swiglu(h, inner, a, mode, input_saved=False) + a * h))
    if c.n_shared_experts:
        total += _swiglu(h, inner * c.n_shared_experts, a, mode, input_saved=True)
    return total


def layer_bytes(
    c: ModelConfig, layer: int, a: int, mode: str, fp8: bool = False, routed: float | None = None
) -> int:
    """Per token, what one block keeps between its forward and its backward.

    full keeps only the block input; the recomputed block's own activations are live once, during its
    backward, and are added once per rank by :func:`activation_bytes`, not per layer.
    """
    if mode == "full":
        return a * c.hidden_size
    return attention_bytes(c, a, mode) + mlp_bytes(c, layer, a, mode, fp8, routed)


def head_bytes(c: ModelConfig, a: int, tokens: int, backward: bool = True) -> int:
    """The output head of a micro-batch of `tokens` tokens, for the LM head and each MTP depth (all reuse it):
    the chunked cross-entropy (ops/cross_entropy.py) keeps the input gradient (a·h per token) and an fp32
    weight gradient (4·V·h) from forward to backward, and holds one chunk's fp32 logits and their gradient
    while it runs; without backward only the chunk."""
    assert c.vocab_size is not None
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // c.vocab_size)) * c.vocab_size * (FP32 + a)
    if not backward:
        return chunk
    return (1 + c.num_nextn_predict_layers) * (
        tokens * a * c.hidden_size + FP32 * c.vocab_size * c.hidden_size
    ) + chunk


def activation_bytes(
    c: ModelConfig,
    stages: Sequence[tuple[Sequence[int], bool]],
    tokens: int,
    in_flight: int,
    a: int,
    mode: str,
    fp8: bool = False,
    routed: float | None = None,
) -> int:
    """stages: (global layer ids incl. MTP blocks, holds the head) of each stage this rank runs.

    Peak ≈ in_flight × the largest stage's bytes for one micro-batch of `tokens` tokens (+ one block's full
    activations under mode=full, for the block being recomputed).
    """
    per_stage = [
        tokens * sum(layer_bytes(c, i, a, mode, fp8, routed) for i in ids)
        + (head_bytes(c, a, tokens) if head else 0)
        for ids, head in stages
    ]
    total = in_flight * max(per_stage, default=0)
    layers = [i for ids, _ in stages for i in ids]
    if mode == "full" and layers:
        total += tokens * max(layer_bytes(c, i, a, "none", fp8, routed) for i in layers)
    return total


def eval_activation_bytes(
    c: ModelConfig,
    stages: Sequence[tuple[Sequence[int], bool]],
    tokens: int,
    a: int,
    routed: float | None = None,
) -> int:
    """A forward without backward (evaluation) keeps nothing between blocks: one micro-batch of `tokens`
    tokens through the largest block (what it would save for backward bounds its live temporaries) and one
    chunk of the head's logits."""
    layers = [i for ids, _ in stages for i in ids]
    block = max((layer_bytes(c, i, a, "none", routed=routed) for i in layers), default=0)
    return tokens * block + (head_bytes(c, a, tokens, backward=False) if any(h for _, h in stages) else 0)


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # parameters this rank holds
    state_bytes: int  # weights + grads + AdamW moments (+ bf16 weight copies)
    activation_bytes: int
    in_flight: int  # micro-batches whose activations are alive at the peak
    recompute: str
    eval_activation_bytes: int = 0  # evaluation: one micro-batch's forward, nothing kept for backward
    # CUDA graphs of the training micro-batches keep their activations' memory between steps, evaluation too
    graphs_hold_activations: bool = False

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    @property
    def eval_total_bytes(self) -> int:
        held = self.activation_bytes if self.graphs_hold_activations else 0
        return self.state_bytes + self.eval_activation_bytes + held

    def line(self, rank: int) -> str:
        return (
            f"rank {rank}: params {self.params:,} ({self.state_bytes / GIB:.3f} GiB weights+grads+Adam), "
            f"activations ~{self.activation_bytes / GIB:.3f} GiB (in-flight {self.in_flight}, "
            f"recompute={self.recompute}), total ~{self.total_bytes / GIB:.3f} GiB; evaluation "
            f"~{self.eval_total_bytes / GIB:.3f} GiB (estimate)"
        )

    def warnings(self, capacity: int | None) -> list[str]:
        """One line for each phase (training step, evaluation) whose estimate exceeds `capacity` bytes of
        device memory (None: unknown, no check), with the keys that shrink it."""
        phases = (
            ("a training step", self.total_bytes, "trainer.recompute=selective|full, parallel.pp or ep"),
            (
                "evaluation",
                self.eval_total_bytes,
                "parallel.pp or ep (it runs the training micro-batches)"
                + (", or trainer.cuda_graph=false" if self.graphs_hold_activations else ""),
            ),
        )
        return [
            f"warning: {what} needs ~{total / GIB:.1f} GiB by the memory estimate, more than the device's "
            f"{capacity / GIB:.1f} GiB: raise parallel.microbatches, or use {keys}"
            for what, total, keys in phases
            if capacity is not None and total > capacity
        ]

    def as_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total_bytes": self.total_bytes, "eval_total_bytes": self.eval_total_bytes}


@dataclass(frozen=True)
class StateSharding:
    """Which part of its parameters' gradients and optimizer state a rank keeps in device memory, as the
    optimizer engine lays them out. The default is replicated AdamW: full fp32 gradients and two moments."""

    optimizer_bytes: int = 8  # optimizer state per parameter before sharding (moments, any master copy)
    dense_shards: int = 1  # ranks the dense parameters' optimizer state is split over
    expert_shards: int = 1  # ranks the expert parameters' optimizer state is split over
    expert_params: int = 0  # how many of the rank's parameters are sharded over `expert_shards`
    grads_sharded: bool = False  # gradients are split like the optimizer state
    offloaded: bool = False  # the optimizer state lives in host memory
    master_weights: bool = False  # bf16 parameters with fp32 masters beside them (optim/master.py)
    bf16_params: bool = False  # bf16 parameters whose fp32 masters the engine counts in `optimizer_bytes`

    def bytes(self, n: int, shards: int, bf16: bool) -> float:
        """fp32 weight, gradient (fp32 also beside bf16 parameters: it accumulates there), optimizer state,
        bf16 weight copy under autocast; with master weights a bf16 parameter and its fp32 master instead of
        the weight and its copy; with bf16 parameters only the parameter."""
        grad = 4 / shards if self.grads_sharded else 4
        opt = 0 if self.offloaded else self.optimizer_bytes / shards
        if self.master_weights:
            weights = 2 + 4
        else:
            weights = 2 if self.bf16_params else 4 + (2 if bf16 else 0)
        return n * (weights + grad + opt)


def estimate_memory(
    model: nn.Module,
    c: ModelConfig,
    stages: Sequence[tuple[Sequence[int], bool]],
    tokens: int,
    in_flight: int,
    mode: str,
    bf16: bool,
    sharding: StateSharding | None = None,
    fp8: bool = False,
    graphs: bool = False,
    dispatch: tuple[float, int] | None = None,
) -> MemoryEstimate:
    """The estimate for the rank holding `model` (its partial model); see the module docstring.
    dispatch: a dispatcher with fixed-size buffers (parallel/dispatch/bounded.py): the expert rows one MoE
    layer keeps per token, and the bytes of its send and receive blocks, live while one layer runs."""
    params = sum(p.numel() for p in model.parameters())
    a = 2 if bf16 else 4
    routed, buffers = dispatch if dispatch is not None else (None, 0)
    acts = activation_bytes(c, stages, tokens, in_flight, a, mode, fp8, routed) + buffers
    s = sharding or StateSharding()
    dense = params - s.expert_params
    state = s.bytes(dense, s.dense_shards, bf16) + s.bytes(s.expert_params, s.expert_shards, bf16)
    evals = eval_activation_bytes(c, stages, tokens, a, routed) + buffers
    return MemoryEstimate(params, int(state), acts, in_flight, mode, evals, graphs)

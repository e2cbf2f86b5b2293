"""DeepSeekMoE: shared experts plus fine-grained routed experts behind a sigmoid (or softmax) router.

Router math follows DeepSeek-V3: scores s = sigmoid(u·e) in fp32; a selection-only bias b
(`e_score_correction_bias`) is added to choose the top-k, never to weigh them; with n_group > 1 a token may
only use experts of its `topk_group` best groups (group score = sum of the group's top-2 biased scores);
gates are the selected s, normalised to sum 1 when `norm_topk_prob`, times `routed_scaling_factor`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.direct_experts import direct_down, direct_hidden
from ..ops.fused import swiglu_act
from ..ops.grouped_gemm import Activation, Taps, expert_swiglu
from .dispatch import Dispatcher, LocalDispatcher, expert_counts
from .mlp import SwiGLU
from .phases import Compute, Program, run
from .recompute import Recomputable, in_backward, maybe_checkpoint
from .stats import MoEStats, RouterRecord


@dataclass(frozen=True)
class BalanceLoss:
    """Which differentiable balance term the router adds: 'seq' (per sequence), 'batch' (per micro-batch)."""

    kind: str | None = None  # None | "seq" | "batch"
    alpha: float = 0.0


@dataclass(frozen=True)
class MoEOptions:
    """What every MoE layer of a model shares: its balance-loss term and which routed experts it holds.

    `expert_slice` = (first global expert, count); None holds all of them (one process). Expert
    parallelism passes a slice so each rank allocates and initialises only its own experts.
    """

    balance: BalanceLoss = BalanceLoss()
    expert_slice: tuple[int, int] | None = None


@dataclass
class Routing:
    topk_idx: torch.Tensor  # (N, K) int64
    topk_weight: torch.Tensor  # (N, K) fp32 gate values
    scores: torch.Tensor  # (N, E) fp32 affinities s (without bias)


def top_k_stable(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries along x's last dim and their indices, largest first, ties to the lower index.

    A stable descending sort where `topk` would do: over a row of experts or groups the sort is as cheap,
    its order on ties is defined (the same choice eager, compiled, on CPU and on GPU), and Inductor lowers it
    to a Triton kernel fused with the router's other ops, where `topk` stays an ATen kernel of its own (a
    launch per layer in a decode step)."""
    values, indices = x.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scoring = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Selection-only bias, updated by the balance controller (not by the optimizer).
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
        )

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach()
        if self.scoring == "sigmoid":
            choice = choice + self.e_score_correction_bias.unsqueeze(0)
        if self.n_group > 1:
            n = choice.shape[0]
            grouped = choice.view(n, self.n_group, self.n_experts // self.n_group)
            if self.scoring == "sigmoid":
                group_score = top_k_stable(grouped, 2)[0].sum(-1)
            else:
                group_score = grouped.amax(dim=-1)
            keep = top_k_stable(group_score, self.topk_group)[1]
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(
                ~group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, self.n_experts), float("-inf")
            )
        topk_idx = top_k_stable(choice, self.top_k)[1]
        topk_weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob and self.top_k > 1:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        return Routing(topk_idx, topk_weight * self.scale, scores)


class RoutedExperts(Recomputable, nn.Module):
    """The routed experts' weights, fused per projection so one grouped GEMM serves all of them.

    `first_expert`/`num_local` say which global experts this module holds (all of them in one process);
    expert parallelism constructs it with a slice.
    """

    def __init__(self, cfg: ModelConfig, first_expert: int = 0, num_local: int | None = None) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.num_local = cfg.n_routed_experts if num_local is None else num_local
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(self.num_local, h, i))
        self.impl = "auto"  # auto | grouped | reference (tests force one) | fp8 (model/fp8.py sets it)
        self.act: Activation = swiglu_act  # FP8 training's keeps FP8 inputs (model/fp8.py sets it)

    @property
    def weighs_rows(self) -> bool:
        """Whether the layer hands these experts each row's gate, for their activation (else the combine
        weighs the rows). FP8 experts leave it to the combine: weighing the rows before the down projection's
        FP8 cast changes which tokens sit near a routing tie under expert parallelism, and the FP8 layout
        check (rel 1e-3 at ep=2) then fails; docs/architecture.md, "The gate in the experts' activation"."""
        return self.impl != "fp8"

    def forward(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        gates: torch.Tensor | None = None,
        taps: Taps | None = None,
    ) -> torch.Tensor:
        """gates: (rows,) each row's gate weight, applied in the activation (None: unweighted rows); taps:
        receives (projection output, weight) pairs (see grouped_gemm.Taps)."""
        act = self.act
        # selective recomputation checkpoints the activation; FP8's recomputes it from its FP8 cache itself
        if self.recompute == "selective" and self.training and act is swiglu_act:
            act = functools.partial(maybe_checkpoint, True, act)
        return expert_swiglu(x, counts, self.gate_up_proj, self.down_proj, self.impl, act, taps, gates)

    def direct(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """(N, H) token rows → their gate-weighted routed output, each chosen expert straight from its weights
        (ops/direct_experts.py: for a few rows, compiled); global expert ids, so all experts local. Its two
        stages are called by attribute, so compiled phases compile each apart (model/compile.py)."""
        return self.direct_down(self.direct_hidden(x, topk_idx), topk_idx, topk_weight)

    def direct_hidden(self, x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """(N, H) rows → (N, K, I) each chosen expert's activation (ops/direct_experts.direct_hidden)."""
        return direct_hidden(x, topk_idx, self.gate_up_proj)

    def direct_down(self, h: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """(N, K, I) activations → (N, H) gate-weighted routed output (ops/direct_experts.direct_down)."""
        return direct_down(h, topk_idx, topk_weight, self.down_proj)


def balance_terms(routing: Routing, batch: int, seq: int, kind: str) -> torch.Tensor:
    """Σ_i f_i P_i (DeepSeek-V3 eq. 17-20): f_i = E/(K·T)·count_i, P_i = mean over tokens of s_i/Σ_j s_j.

    kind 'seq' computes it per sequence and averages over sequences; 'batch' over all tokens at once.
    """
    scores = routing.scores
    n_exp, k = scores.shape[-1], routing.topk_idx.shape[-1]
    probs = scores / scores.sum(-1, keepdim=True)
    groups = batch if kind == "seq" else 1
    probs = probs.view(groups, -1, n_exp)
    tokens = probs.shape[1]
    onehot = torch.zeros(groups, tokens, n_exp, device=scores.device)
    onehot.scatter_(2, routing.topk_idx.view(groups, tokens, k), 1.0)
    f = onehot.sum(1) * (n_exp / (k * tokens))
    p = probs.mean(1)
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, options: MoEOptions | None = None) -> None:
        super().__init__()
        options = options or MoEOptions()
        self.layer_id = layer_id
        self.n_experts = cfg.n_routed_experts
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg, *(options.expert_slice or (0, None)))
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0
            else None
        )
        self.balance = options.balance
        self.dispatcher: Dispatcher = LocalDispatcher()
        # token rows up to which the layer skips dispatch and computes each chosen expert straight from its
        # weights (`RoutedExperts.direct`); 0: never. Only compiled phases set it (model/compile.py).
        self.direct_rows = 0

    def forward(self, x: torch.Tensor, stats: MoEStats | None = None) -> torch.Tensor:
        """The layer alone (B, T, H) -> (B, T, H): its phases run eagerly, routed plus shared output."""
        return self.output(*run(self.program(x, stats))).view_as(x)

    @staticmethod
    def output(routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """The layer's output rows: the routed experts' plus the shared experts' (none: routed alone)."""
        return routed if shared is None else routed + shared

    def program(self, x: torch.Tensor, stats: MoEStats | None = None) -> Program:
        """The layer's phases (model/phases.py): route, plan, dispatch with the shared experts computed while
        it is in flight, routed experts (each row weighted by its gate in their activation; weight gradients
        deferrable), combine (a token's sum of its rows; their gates weigh them in the experts' activation, or
        in the combine where the experts say so). Returns (routed, shared):
        (B·T, H) token rows each, shared None without shared experts; the decoder block's `finish` adds
        them to the residual."""
        d = self.dispatcher
        flat, topk_idx, topk_weight = yield Compute(
            "route", self._route, (x, stats), join=True, layer=self.layer_id
        )
        if 0 < flat.shape[0] <= self.direct_rows:  # a few rows (decode): no dispatch, no sort
            routed = yield Compute("experts", self.experts.direct, (flat, topk_idx, topk_weight), join=True)
            shared = None
            if self.shared_experts is not None:
                shared = yield Compute("shared", self.shared_experts, (flat,))
            return routed, shared
        plan = yield from d.plan(topk_idx, self.n_experts)
        handle = yield from d.dispatch_start(plan, flat, topk_weight)
        shared = None
        if self.shared_experts is not None:
            shared = yield Compute("shared", self.shared_experts, (flat,))
        rows, counts, gates = yield from d.dispatch_wait(plan, handle)
        weighs = self.experts.weighs_rows
        expert_gates, combine_gates = (gates, None) if weighs else (None, gates)
        y = yield Compute("experts", self.experts, (rows, counts, expert_gates), join=True, deferred_w=True)
        handle = yield from d.combine_start(plan, y, combine_gates)
        routed = yield from d.combine_wait(plan, handle)
        return routed, shared

    def _route(self, x: torch.Tensor, stats: MoEStats | None) -> tuple[torch.Tensor, ...]:
        """(B·T, H) token rows, their top-k expert ids and gate weights."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        routing = self.route(flat, B, T, stats)
        return flat, routing.topk_idx, routing.topk_weight

    def route(self, flat: torch.Tensor, batch: int, seq: int, stats: MoEStats | None = None) -> Routing:
        """Routing of the (batch·seq, hidden) tokens `flat`, with the router record (loads and the balance
        term) added to `stats`."""
        routing = self.gate(flat)
        if stats is not None:
            counts = expert_counts(routing.topk_idx, self.n_experts)  # no host sync, unlike bincount
            loss = None
            if self.training and self.balance.kind and self.balance.alpha > 0:
                loss = self.balance.alpha * balance_terms(routing, batch, seq, self.balance.kind)
            # A checkpointed block re-runs this forward inside backward: it must compute the same tensors
            # (checkpointing matches saved tensors by order) but not record the router twice. The graph
            # keeps the balance-loss term of the original forward.
            if not in_backward():
                stats.add(RouterRecord(self.layer_id, counts, loss))
        return routing

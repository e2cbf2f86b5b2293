"""The DeepSeek-V3 decoder: embedding, first-k dense blocks, MoE blocks, final norm, untied head, MTP.

Layers live in a ModuleDict keyed by their *global* index, so parameter names (`layers.7.mlp...`) are the
same in every layout: pipeline stages hold a subset of the same keys, deterministic initialisation and
checkpoints key on these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..ops.cross_entropy import linear_cross_entropy
from .attention import MLA
from .documents import Documents
from .mlp import SwiGLU
from .moe import BalanceLoss, MoE, MoEOptions
from .norm import RMSNorm
from .phases import Compute, Program, run
from .recompute import Recomputable, maybe_checkpoint
from .rope import RotaryTable
from .stats import MoEStats

# attention over a block's normalised input: MLA by default; inference passes one with its latent cache
Attend = Callable[[torch.Tensor], torch.Tensor]


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """MTP blocks (layer >= num_hidden_layers) are MoE blocks, like DeepSeek-V3's."""
    if layer >= cfg.num_hidden_layers:
        return True
    return layer >= cfg.first_k_dense_replace and layer % cfg.moe_layer_freq == 0


class DecoderLayer(Recomputable, nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryTable, moe: MoEOptions) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module
        if is_moe_layer(cfg, layer_id):
            self.mlp = MoE(cfg, layer_id, moe)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, h: torch.Tensor, stats: MoEStats | None = None, docs: Documents | None = None
    ) -> torch.Tensor:
        # Full recomputation: only the block input is kept; the whole block runs again inside backward.
        return maybe_checkpoint(self.recompute == "full" and self.training, self._run, h, stats, docs)

    def _run(self, h: torch.Tensor, stats: MoEStats | None, docs: Documents | None) -> torch.Tensor:
        return run(self.program(h, stats, docs=docs))

    def program(
        self,
        h: torch.Tensor,
        stats: MoEStats | None = None,
        attend: Attend | None = None,
        docs: Documents | None = None,
    ) -> Program:
        """The block as phases (model/phases.py): attention with its residual, then the MLP — a MoE
        layer's phases and `finish`, or the dense MLP. attend: the attention over the normalised input
        (default `self_attn` within `docs`; inference passes its cached attention)."""
        h1, x = yield Compute("attn", self.attention, (h, attend, docs), layer=self.layer_id)
        if isinstance(self.mlp, MoE):
            routed, shared = yield from self.mlp.program(x, stats)
            return (yield Compute("finish", self.finish, (h1, routed, shared), join=True))
        return (yield Compute("mlp", self._dense, (h1, x), join=True))

    def attention(
        self, h: torch.Tensor, attend: Attend | None = None, docs: Documents | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h + attention(norm(h)), and its normalised value (the MLP's input)."""
        x = self.input_layernorm(h)
        h1 = h + (attend(x) if attend is not None else self.self_attn(x, docs))
        return h1, self.post_attention_layernorm(h1)

    def finish(self, h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """The MoE block's output: residual + routed experts' + shared experts' rows ((B·T, H) each)."""
        return h + MoE.output(routed, shared).view_as(h)

    def _dense(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(x)


class MTPLayer(nn.Module):
    """Multi-token prediction depth k: combine h^{k-1}_i with Emb(t_{i+k}), one block, shared head."""

    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryTable, moe: MoEOptions) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, layer_id, rotary, moe)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb_next: torch.Tensor,
        stats: MoEStats | None,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1))
        return self.block(h, stats, docs)


@dataclass
class ModelOutput:
    lm_loss: torch.Tensor | None
    mtp_loss: torch.Tensor | None  # mean over MTP depths, unweighted (the trainer applies lambda)
    logits: torch.Tensor | None
    lm_loss_rows: torch.Tensor | None = None  # [b] each sequence's mean LM loss, detached (`row_losses`)


class Transformer(nn.Module):
    """The whole model, or one pipeline stage of it.

    A stage holds `layer_ids` (global indices) and, when `first`, the embedding; when `last`, the final norm,
    the head and the MTP blocks — plus its own copy of the embedding, which MTP reads (the pipeline sums the
    two copies' gradients). Names stay those of the whole model, so initialisation, checkpoints and HF
    conversion see one set of names whatever the layout.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        balance: BalanceLoss | None = None,
        expert_slice: tuple[int, int] | None = None,
        layer_ids: Sequence[int] | None = None,
        first: bool = True,
        last: bool = True,
    ) -> None:
        super().__init__()
        moe = MoEOptions(balance or BalanceLoss(), expert_slice)
        if cfg.vocab_size is None:
            raise ValueError(
                "model.vocab_size must be resolved (from the tokenizer) before building the model"
            )
        self.cfg = cfg
        self.is_first, self.is_last = first, last
        self.row_losses = False  # head also returns each sequence's LM loss (a mixture's loss per source)
        self.rotary = RotaryTable(
            cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        needs_embedding = first or (last and cfg.num_nextn_predict_layers > 0)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if needs_embedding else None
        ids = range(cfg.num_hidden_layers) if layer_ids is None else layer_ids
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, self.rotary, moe) for i in ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if last else None
        self.mtp = nn.ModuleList(
            MTPLayer(cfg, cfg.num_hidden_layers + d, self.rotary, moe)
            for d in range(cfg.num_nextn_predict_layers if last else 0)
        )

    @property
    def layer_ids(self) -> list[int]:
        return [int(k) for k in self.layers]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def program(
        self,
        x: torch.Tensor,
        stats: MoEStats | None = None,
        head: Callable[[torch.Tensor], Any] | None = None,
        layer_ids: Sequence[int] | None = None,
        embed: bool | None = None,
        phases: bool = False,
        docs: Documents | None = None,
    ) -> Program:
        """The forward as ops (model/phases.py): the embedding when `embed` (default: this holds the first
        layers), the layers `layer_ids` (default: all held) in order, then `head(h)` if given; returns the
        head's value, else the hidden states. x: token ids with the embedding, hidden states otherwise.
        phases: each block as its phases (the overlap engine cuts them); otherwise one op per block, which
        may recompute the whole block (`trainer.recompute=full`). docs: the sequences' documents (None: one
        causal sequence each)."""
        h = x
        if self.is_first if embed is None else embed:
            h = yield Compute("embed", self.embed_tokens, (x,))
        for i in self.layers if layer_ids is None else layer_ids:
            layer = self.layers[str(i)]
            if phases:
                h = yield from layer.program(h, stats, docs=docs)
            else:
                h = yield Compute("block", layer, (h, stats, docs), layer=layer.layer_id)
        if head is None:
            return h
        return (yield Compute("head", head, (h,)))

    def hidden_states(
        self, input_ids: torch.Tensor, stats: MoEStats | None = None, docs: Documents | None = None
    ) -> torch.Tensor:
        """The last held layer's output, before the final norm."""
        return run(self.program(input_ids, stats, docs=docs))

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        stats: MoEStats | None = None,
        return_logits: bool = False,
        docs: Documents | None = None,
    ) -> torch.Tensor | ModelOutput:
        """x: token ids where this holds the embedding, hidden states elsewhere. labels[:, i] is the token
        after x[:, i]; MTP depth k predicts labels[:, i + k]. The losses (ModelOutput) where this holds the
        head, else the hidden states."""
        if not self.is_last:
            return self.hidden_states(x, stats, docs)

        def head(h: torch.Tensor) -> ModelOutput:
            return self.head(h, labels, stats, return_logits, docs)

        return run(self.program(x, stats, head, docs=docs))

    def head(
        self,
        h: torch.Tensor,
        labels: torch.Tensor | None,
        stats: MoEStats | None = None,
        return_logits: bool = False,
        docs: Documents | None = None,
    ) -> ModelOutput:
        """Final norm, logits, the LM loss and the MTP blocks' loss (labels given). With `docs`, an MTP
        target in another document than its position's is left out: it counts zero, and each depth's mean
        still divides by all its positions, so the loss does not depend on how a batch is cut."""
        h = self.norm(h)
        logits = self.lm_head(h) if labels is None or return_logits else None
        if labels is None:
            return ModelOutput(None, None, logits)
        w = self._head_weight()
        lm_loss, ce = self._cross_entropy(h, labels, w)
        rows = ce.view(labels.shape).mean(1) if self.row_losses else None
        mtp_loss = None
        if len(self.mtp) and labels.shape[1] > len(self.mtp):
            losses = []
            # Depth 1 combines the main model's *normalised* output with Emb(t_{i+1}), as transformers,
            # vLLM and SGLang feed DeepSeek-V3's released MTP weights; deeper ones take the raw output
            # of the previous MTP block.
            h_prev = h
            for k, layer in enumerate(self.mtp, start=1):
                n = labels.shape[1] - k
                emb_next = self.embed_tokens(labels[:, k - 1 : k - 1 + n])
                h_prev = layer(h_prev[:, :n], emb_next, stats, None if docs is None else docs.prefix(n))
                same = None if docs is None or docs.single else docs.same(k)
                losses.append(self._cross_entropy(layer.norm(h_prev), labels[:, k:], w, same)[0])
            mtp_loss = torch.stack(losses).mean()
        return ModelOutput(lm_loss, mtp_loss, logits, rows)

    def _head_weight(self) -> torch.Tensor:
        """The head's weight as its matmuls take it: under autocast cast once per forward, shared by the LM
        head and every MTP depth, rather than once per use."""
        w = self.lm_head.weight
        device = w.device.type
        return w.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else w

    @staticmethod
    def _cross_entropy(
        h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of normalised states h [b, n, D] through the head `weight` against labels [b, n], each
        target weighted by `weights` (None: all 1), the mean over all b·n positions; and each position's loss,
        detached."""
        flat = None if weights is None else weights.reshape(-1)
        return linear_cross_entropy(h.flatten(0, 1), weight, labels.reshape(-1), flat)

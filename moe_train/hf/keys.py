"""The one table that ties hub tensor names to moe_train parameters, used by import and export alike.

Hub layout (what DeepSeek released and transformers' save_pretrained writes): a ``model.`` prefix, routed
experts stored one tensor per expert and projection, and MTP depth d stored as decoder layer
``num_hidden_layers + d`` with its own copies of the shared embedding and output head.  moe_train fuses the
experts (``gate_up_proj`` [E, 2I, H], gate rows first; ``down_proj`` [E, H, I]), keeps MTP under ``mtp.{d}``
and shares the embedding and head.  One more difference is in ``eh_proj``: the hub's [H, 2H] matrix takes
``[enorm(embedding); hnorm(hidden)]`` (transformers' MtpLayer, vLLM), moe_train's takes
``[hnorm(hidden); enorm(embedding)]``, so the two column halves swap on the way through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint.slices import Box, TensorSlice, copy_slice
from ..config import ModelConfig
from ..model.transformer import is_moe_layer

# How a hub tensor relates to the moe_train tensor `ours`:
SAME = "same"  # identical
GATE = "gate"  # rows [0, I) of ours[expert]
UP = "up"  # rows [I, 2I) of ours[expert]
DOWN = "down"  # ours[expert]
SWAP_HALVES = "swap_halves"  # ours with its two column halves exchanged (MTP eh_proj)
COPY = "copy"  # a duplicate of a shared tensor: written on export, compared (not loaded) on import
EMPTY = "empty"  # a zero-size tensor (shared experts when n_shared_experts=0): written, checked, not loaded


@dataclass(frozen=True)
class Entry:
    hub: str
    ours: str | None  # None for EMPTY
    kind: str
    shape: tuple[int, ...]  # the hub tensor's shape
    expert: int = -1


def _attn(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    out: list[tuple[str, tuple[int, ...]]] = []
    if cfg.q_lora_rank:
        out += [
            ("q_a_proj.weight", (cfg.q_lora_rank, h)),
            ("q_a_layernorm.weight", (cfg.q_lora_rank,)),
            ("q_b_proj.weight", (heads * qk, cfg.q_lora_rank)),
        ]
    else:
        out.append(("q_proj.weight", (heads * qk, h)))
    out += [
        ("kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)),
        ("kv_a_layernorm.weight", (cfg.kv_lora_rank,)),
        ("kv_b_proj.weight", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
        ("o_proj.weight", (h, heads * cfg.v_head_dim)),
    ]
    return [("self_attn." + n, s) for n, s in out]


def _block(cfg: ModelConfig, layer: int, hub: str, ours: str) -> list[Entry]:
    """One decoder layer: hub prefix `hub` (e.g. 'model.layers.3.'), moe_train prefix `ours`."""
    h = cfg.hidden_size
    out = [Entry(hub + "input_layernorm.weight", ours + "input_layernorm.weight", SAME, (h,))]
    out += [Entry(hub + n, ours + n, SAME, s) for n, s in _attn(cfg)]
    out.append(
        Entry(hub + "post_attention_layernorm.weight", ours + "post_attention_layernorm.weight", SAME, (h,))
    )
    if not is_moe_layer(cfg, layer):
        i = cfg.intermediate_size
        for n, s in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            out.append(Entry(f"{hub}mlp.{n}.weight", f"{ours}mlp.{n}.weight", SAME, s))
        return out
    e_n, i = cfg.n_routed_experts, cfg.moe_intermediate_size
    out.append(Entry(hub + "mlp.gate.weight", ours + "mlp.gate.weight", SAME, (e_n, h)))
    out.append(
        Entry(
            hub + "mlp.gate.e_score_correction_bias", ours + "mlp.gate.e_score_correction_bias", SAME, (e_n,)
        )
    )
    gate_up, down = ours + "mlp.experts.gate_up_proj", ours + "mlp.experts.down_proj"
    for e in range(e_n):
        p = f"{hub}mlp.experts.{e}."
        out.append(Entry(p + "gate_proj.weight", gate_up, GATE, (i, h), e))
        out.append(Entry(p + "up_proj.weight", gate_up, UP, (i, h), e))
        out.append(Entry(p + "down_proj.weight", down, DOWN, (h, i), e))
    si = i * cfg.n_shared_experts
    for n, s in (("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))):
        key = f"mlp.shared_experts.{n}.weight"
        out.append(Entry(hub + key, ours + key if si else None, SAME if si else EMPTY, s))
    return out


def hub_entries(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of the hub layout for `cfg`, in file order (embedding, layers, head, MTP layers)."""
    h, v, n_layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    if v is None:
        raise ValueError("model.vocab_size must be set to map a model onto the hub layout")
    out = [Entry("model.embed_tokens.weight", "embed_tokens.weight", SAME, (v, h))]
    for i in range(n_layers):
        out += _block(cfg, i, f"model.layers.{i}.", f"layers.{i}.")
    out.append(Entry("model.norm.weight", "norm.weight", SAME, (h,)))
    out.append(Entry("lm_head.weight", "lm_head.weight", SAME, (v, h)))
    for d in range(cfg.num_nextn_predict_layers):
        hub, ours = f"model.layers.{n_layers + d}.", f"mtp.{d}."
        out += [
            Entry(hub + "embed_tokens.weight", "embed_tokens.weight", COPY, (v, h)),
            Entry(hub + "enorm.weight", ours + "enorm.weight", SAME, (h,)),
            Entry(hub + "hnorm.weight", ours + "hnorm.weight", SAME, (h,)),
            Entry(hub + "eh_proj.weight", ours + "eh_proj.weight", SWAP_HALVES, (h, 2 * h)),
        ]
        out += _block(cfg, n_layers + d, hub, ours + "block.")
        out += [
            Entry(hub + "shared_head.norm.weight", ours + "norm.weight", SAME, (h,)),
            Entry(hub + "shared_head.head.weight", "lm_head.weight", COPY, (v, h)),
        ]
    return out


def mtp_depth(cfg: ModelConfig, hub_key: str) -> int | None:
    """The MTP depth a hub key belongs to (layer index >= num_hidden_layers), else None."""
    if not hub_key.startswith("model.layers."):
        return None
    layer = int(hub_key.split(".")[2])
    return layer - cfg.num_hidden_layers if layer >= cfg.num_hidden_layers else None


def to_hub(entry: Entry, ours: torch.Tensor) -> torch.Tensor:
    """The hub tensor of `entry` as a view or small expression of moe_train's tensor (export)."""
    if entry.kind in (SAME, COPY):
        return ours
    if entry.kind == GATE:
        return ours[entry.expert, : entry.shape[0]]
    if entry.kind == UP:
        return ours[entry.expert, entry.shape[0] :]
    if entry.kind == DOWN:
        return ours[entry.expert]
    if entry.kind == SWAP_HALVES:
        h = entry.shape[1] // 2
        return torch.cat([ours[:, h:], ours[:, :h]], dim=1)
    raise ValueError(f"no moe_train tensor for {entry.hub} ({entry.kind})")


@torch.no_grad()
def write_ours(entry: Entry, dst: torch.Tensor, src: torch.Tensor, local_expert: int | None = None) -> None:
    """Copy the hub tensor `src` into moe_train's tensor `dst` (import); casts to dst's dtype and device."""
    e = entry.expert if local_expert is None else local_expert
    if entry.kind == SAME:
        dst.copy_(src)
    elif entry.kind == GATE:
        dst[e, : entry.shape[0]].copy_(src)
    elif entry.kind == UP:
        dst[e, entry.shape[0] :].copy_(src)
    elif entry.kind == DOWN:
        dst[e].copy_(src)
    elif entry.kind == SWAP_HALVES:
        h = entry.shape[1] // 2
        dst[:, :h].copy_(src[:, h:])
        dst[:, h:].copy_(src[:, :h])
    else:
        raise ValueError(f"{entry.hub} ({entry.kind}) is not loaded into a parameter")


def write_ours_slice(
    entry: Entry,
    dst: torch.Tensor,
    read: Callable[[Box], torch.Tensor],
    held: TensorSlice,
    local_expert: int | None = None,
) -> None:
    """`write_ours` for a `dst` that holds only `held` of moe_train's whole tensor: only the boxes of the hub
    tensor that fall in it are read (`read(box)`)."""
    e = entry.expert if local_expert is None else local_expert
    if entry.kind == SAME:
        copy_slice(dst, read, entry.shape, held)
    elif entry.kind in (GATE, UP):
        inter = entry.shape[0]
        rows = (0 if entry.kind == GATE else inter, inter)
        copy_slice(dst[e], read, (2 * inter, entry.shape[1]), held.shifted(-1), box={0: rows})
    elif entry.kind == DOWN:
        copy_slice(dst[e], read, entry.shape, held.shifted(-1))
    else:
        raise ValueError(f"{entry.hub} ({entry.kind}) cannot be read in slices")

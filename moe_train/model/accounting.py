"""Parameter counts (total and active per token) and training FLOPs per token, for logs and MFU.

Counting rule (docs/architecture.md): every parameter counts — embedding and output head included — and
the MTP modules are left out of "total" and "active" to match DeepSeek-V3's published 671B / 37B.
"Active" counts, in each MoE layer, `num_experts_per_tok` routed experts instead of all of them.
The counts are computed from the config, so the full 671B shape needs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # all parameters except MTP
    active: int  # per token, except MTP
    embedding: int  # input embedding (a lookup, no FLOPs)
    mtp_total: int
    mtp_active: int


def _attention(c: ModelConfig) -> int:
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    n = c.num_attention_heads
    if c.q_lora_rank:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * qk
    else:
        q = c.hidden_size * n * qk
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)
    o = n * c.v_head_dim * c.hidden_size
    return q + kv + o + 2 * c.hidden_size  # + the block's two norms


def _moe(c: ModelConfig, active: bool) -> int:
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    routed = (c.num_experts_per_tok if active else c.n_routed_experts) * per_expert
    return routed + c.n_shared_experts * per_expert + c.n_routed_experts * c.hidden_size  # + router


def count_params(c: ModelConfig) -> ParamCounts:
    assert c.vocab_size is not None
    dense_mlp = 3 * c.hidden_size * c.intermediate_size
    from .transformer import is_moe_layer

    total = active = 0
    for layer in range(c.num_hidden_layers):
        att = _attention(c)
        if is_moe_layer(c, layer):
            total += att + _moe(c, False)
            active += att + _moe(c, True)
        else:
            total += att + dense_mlp
            active += att + dense_mlp
    emb = c.vocab_size * c.hidden_size
    outer = 2 * emb + c.hidden_size  # embedding, head, final norm
    total += outer
    active += outer
    mtp_extra = 2 * c.hidden_size * c.hidden_size + 3 * c.hidden_size  # eh_proj + enorm, hnorm, norm
    att = _attention(c)
    mtp_total = c.num_nextn_predict_layers * (att + _moe(c, False) + mtp_extra)
    mtp_active = c.num_nextn_predict_layers * (att + _moe(c, True) + mtp_extra)
    return ParamCounts(total, active, emb, mtp_total, mtp_active)


def attention_flops_per_pair(c: ModelConfig, include_mtp: bool = True) -> float:
    """Training FLOPs of one allowed (query, key) pair over all attention layers: QK^T and AV forward,
    2·n_h·(d_qk + d_v), times 3 for forward and backward."""
    layers = c.num_hidden_layers + (c.num_nextn_predict_layers if include_mtp else 0)
    return 6.0 * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * layers


def train_flops_per_token(c: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    """6 × (active parameters that do matmuls, head included) + causal attention over the whole sequence
    (a mean context of T/2 pairs per token; document masks allow fewer: `attention_flops_per_pair`)."""
    p = count_params(c)
    matmul_params = p.active - p.embedding
    if include_mtp:
        matmul_params += (
            p.mtp_active + c.num_nextn_predict_layers * c.vocab_size * c.hidden_size
        )  # head reused
    return 6.0 * matmul_params + attention_flops_per_pair(c, include_mtp) * seq_len / 2

"""The best step time this design could reach on this GPU, part by part (the single-GPU speed issue's
roofline).

For the model and batch given by `train.py` overrides (default: the yardstick, the 6-layer V2-Lite proxy at
seq 4096, micro-batch 2, 8 micro-batches a step), every part of an optimizer step is priced at a rate measured
here in the same process:
  dense matmuls   each distinct nn.Linear shape (attention projections, dense and shared MLPs, the LM head),
                  timed forward plus both backward GEMMs at the micro-batch's tokens, times how many there are
  routed experts  `torch._grouped_mm` forward plus backward over evenly loaded experts (the grouped GEMM's
                  best case), times the MoE layers
  attention       cuDNN SDPA causal forward plus backward at MLA's head dims, times the layers
  bytes           what must cross HBM at the measured copy bandwidth: AdamW over fp32 masters and moments
                  and the cast back (34 bytes a parameter a step), fp32 gradient accumulation (8 bytes a
                  parameter a micro-batch after the first), the norms, SwiGLU, RoPE and the head's softmax
                  (each read once and written once forward, twice backward)
The sum is the bound; `--measured TOKENS_PER_S` (the trainer's own, from metrics.jsonl) prints the fraction
of it reached. Matmul FLOPs for MFU are `train_flops_per_token`'s.

`--fp8` also times every GEMM `trainer.dtype=fp8` runs in FP8 (each eligible linear but the head through
`fp8_linear`, the routed experts through `expert_swiglu_fp8`, casts included) against its bf16 time above, and
prints Amdahl's bound on the FP8 trainer's speed-up: the measured bf16 step (`--measured`, else the bound)
with each GEMM's bf16 time replaced by its FP8 time, everything else unchanged.

Usage (GPU machine): python bench/roofline.py [overrides] [--measured 72207] [--fp8]
CPU smoke test: python bench/roofline.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import median_ms  # noqa: E402
from moe_train.config import load_config, to_object  # noqa: E402
from moe_train.model import build_model, train_flops_per_token  # noqa: E402
from moe_train.model.moe import RoutedExperts  # noqa: E402
from moe_train.model.norm import RMSNorm  # noqa: E402
from moe_train.ops.fp8 import fp8_eligible, fp8_linear, swiglu_fp8_cached  # noqa: E402
from moe_train.ops.grouped_gemm import expert_swiglu  # noqa: E402

YARDSTICK = [
    "model=deepseek_v2_lite",
    "model.num_hidden_layers=6",
    "data=synthetic",
    "data.synthetic_vocab=102400",
    "data.seq_len=4096",
    "data.batch_size=16",
    "parallel.microbatches=8",
]
TINY = [
    "model.num_hidden_layers=2",
    "data=synthetic",
    "data.seq_len=64",
    "data.batch_size=4",
    "parallel.microbatches=2",
]
ADAMW_BYTES = 34  # fused AdamW over fp32 master, grad, two moments (7 × 4) + the bf16 cast back (4 + 2)
ACCUMULATE_BYTES = 8  # read and write the fp32 gradient buffer per micro-batch after the first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model, for a CPU smoke test")
    ap.add_argument("--measured", type=float, default=None, help="the trainer's tokens/s to compare")
    ap.add_argument("--fp8", action="store_true", help="FP8 GEMM times and the FP8 trainer's Amdahl bound")
    a, overrides = ap.parse_known_args()
    cfg = to_object(load_config([*(TINY if a.tiny else YARDSTICK), *overrides]))
    m, d = cfg.model, a.device
    m.vocab_size = m.vocab_size or cfg.data.synthetic_vocab  # both configs train on synthetic tokens
    micro = cfg.data.batch_size // cfg.parallel.microbatches
    tokens, T = micro * cfg.data.seq_len, cfg.data.seq_len
    dtype = torch.bfloat16 if d == "cuda" else torch.float32
    model = build_model(m, device="meta")
    linears = Counter(
        (mod.in_features, mod.out_features) for mod in model.modules() if isinstance(mod, torch.nn.Linear)
    )
    # what trainer.dtype=fp8 runs in FP8 (model/fp8.convert_to_fp8): every eligible linear but the head
    fp8_linears = Counter(
        (mod.in_features, mod.out_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and name.split(".")[-1] != "lm_head"
        and fp8_eligible(mod.in_features, mod.out_features)
    )
    gemms: list[tuple[str, float, float]] = []  # (GEMM, bf16 ms, FP8 ms) per micro-batch, under --fp8
    experts = [mod for mod in model.modules() if isinstance(mod, RoutedExperts)]
    norms = [mod for mod in model.modules() if isinstance(mod, RMSNorm)]
    params = sum(p.numel() for p in model.parameters())
    rows: list[tuple[str, str, float]] = []  # (part, how it is priced, ms per micro-batch)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=d, dtype=dtype).requires_grad_()

    dense_ms = 0.0
    for (fan_in, fan_out), n in sorted(linears.items()):
        x, w = leaf(tokens, fan_in), leaf(fan_out, fan_in)
        go = torch.randn(tokens, fan_out, device=d, dtype=dtype)
        one = median_ms(lambda x=x, w=w, go=go: F.linear(x, w).backward(go), 5, 3, d)
        dense_ms += n * one
        if a.fp8 and fp8_linears[fan_in, fan_out]:
            n8 = fp8_linears[fan_in, fan_out]
            low = median_ms(lambda x=x, w=w, go=go: fp8_linear(x, w).backward(go), 5, 3, d)
            gemms.append((f"linear {fan_in}→{fan_out} ×{n8}", n8 * one, n8 * low))
    flops = 6.0 * tokens * sum(i * o * n for (i, o), n in linears.items())
    rows.append(("dense matmuls", f"{len(linears)} shapes, {flops / dense_ms / 1e9:.0f} TFLOP/s", dense_ms))

    if experts:
        e = experts[0]
        E, K = e.num_local, m.num_experts_per_tok
        counts = torch.full((E,), tokens * K // E, device=d, dtype=torch.int64)
        x = leaf(int(counts.sum()), m.hidden_size)
        gu, dn = leaf(*e.gate_up_proj.shape), leaf(*e.down_proj.shape)
        go = torch.randn(x.shape, device=d, dtype=dtype)
        one = median_ms(lambda: expert_swiglu(x, counts, gu, dn).backward(go), 5, 3, d)
        flops = 6.0 * x.shape[0] * 3 * m.hidden_size * m.moe_intermediate_size
        rows.append(("routed experts", f"grouped GEMM, {flops / one / 1e9:.0f} TFLOP/s", one * len(experts)))
        if a.fp8 and fp8_eligible(m.hidden_size, m.moe_intermediate_size):

            def fp8_experts() -> None:
                expert_swiglu(x, counts, gu, dn, "fp8", swiglu_fp8_cached).backward(go)

            low = median_ms(fp8_experts, 5, 3, d)
            gemms.append((f"routed experts ×{len(experts)}", one * len(experts), low * len(experts)))

    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    dqk, dv, H = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim, m.num_attention_heads
    q, k, v = leaf(micro, H, T, dqk), leaf(micro, H, T, dqk), leaf(micro, H, T, dv)
    go = torch.randn(micro, H, T, dv, device=d, dtype=dtype)
    att = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go), 5, 3, d)
    flops = 6.0 * H * (dqk + dv) * micro * T * (T + 1) / 2
    rows.append(("attention", f"causal SDPA, {flops / att / 1e9:.0f} TFLOP/s", att * layers))

    src = torch.empty(1 << 28, device=d, dtype=torch.uint8)
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / median_ms(lambda: dst.copy_(src), 5, 3, d) / 1e6  # GB/s: read + write
    el = 2  # bytes of a bf16 activation
    dense_layers = m.num_hidden_layers + m.num_nextn_predict_layers - len(experts)
    moe_inter = m.moe_intermediate_size * m.num_experts_per_tok + m.moe_intermediate_size * m.n_shared_experts
    byte_parts = {
        "AdamW + cast back": ADAMW_BYTES * params / cfg.parallel.microbatches,
        "fp32 grad accumulation": ACCUMULATE_BYTES
        * params
        * (cfg.parallel.microbatches - 1)
        / cfg.parallel.microbatches,
        "norms": 3 * 2 * el * tokens * sum(n.weight.numel() for n in norms),
        "SwiGLU": 3 * 3 * el * tokens * (moe_inter * len(experts) + m.intermediate_size * dense_layers),
        "RoPE": 3 * 2 * el * tokens * m.qk_rope_head_dim * (H + 1) * layers,
        "head softmax": 2 * el * tokens * m.vocab_size * (1 + m.num_nextn_predict_layers),
    }
    for name, b in byte_parts.items():
        rows.append((name, f"{b / 1e9:.2f} GB at {gbps:.0f} GB/s", b / gbps / 1e6))

    total = sum(ms for _, _, ms in rows)
    best = tokens / (total / 1e3)
    fpt = train_flops_per_token(m, T)
    name = torch.cuda.get_device_name() if d == "cuda" else "cpu"
    config = " ".join([*(TINY if a.tiny else YARDSTICK), *overrides])
    print(f"{name}, torch {torch.__version__}; {config}")
    print(f"{params / 1e6:,.1f}M parameters, micro-batch {micro} × {T}, {cfg.parallel.microbatches} per step")
    print("| part | priced as | ms per micro-batch | share |")
    print("|---|---|---:|---:|")
    for part, how, ms in rows:
        print(f"| {part} | {how} | {ms:.2f} | {ms / total:.0%} |")
    print(f"| **bound** | {best:,.0f} tokens/s, {best * fpt / 1e12:.0f} TFLOP/s | **{total:.2f}** | |")
    if a.measured:
        print(f"measured {a.measured:,.0f} tokens/s: {a.measured / best:.0%} of the bound")
    if a.fp8:
        step = tokens / a.measured * 1e3 if a.measured else total  # ms per micro-batch in bf16
        print("| GEMM (forward + backward, per micro-batch) | bf16 ms | FP8 ms | speed-up |")
        print("|---|---:|---:|---:|")
        for what, hi, low in gemms:
            print(f"| {what} | {hi:.2f} | {low:.2f} | {hi / low:.2f}× |")
        hi, low = sum(g[1] for g in gemms), sum(g[2] for g in gemms)
        bound = step / (step - hi + low)
        share = f"{hi / step:.0%} of the bf16 step"
        print(f"| all FP8 GEMMs ({share}) | {hi:.2f} | {low:.2f} | {hi / low:.2f}× |")
        print(f"Amdahl's bound on the FP8 trainer against bf16: {bound:.2f}× (bf16 step {step:.1f} ms)")


if __name__ == "__main__":
    main()

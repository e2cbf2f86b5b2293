"""Training throughput on one GPU: moe_train against transformers' DeepseekV3ForCausalLM, same shape.

Why this exists: MFU claims are only meaningful against a reference measured on the same GPU, in the same
process, on the same batch, with the same FLOP formula.  The yardstick is the 12-layer DeepSeek-V2-Lite-shaped
proxy of ../shared/notes/facts-seen-here.md (seq 4096, batch 2, bf16); every variant does a bare step
(forward, loss, backward, fused AdamW step, zero_grad) so that only the model code and the weight precision
differ:

  hf    transformers DeepseekV3ForCausalLM, bf16 weights, fused AdamW, sdpa attention, grouped_mm experts
  bf16  moe_train, bf16 weights, fused AdamW (like hf)
  amp   moe_train, fp32 master weights + bf16 autocast (the trainer's old default on CUDA)
  bf16c bf16, each block's phases compiled (`trainer.compile=phases`, moe_train/model/compile.py)

A variant may carry its own depth and batch, `amp:8` or `bf16:12:2` (name:layers:batch), because fp32 master
weights plus Adam moments (16 bytes a parameter) of the 6.9B-parameter 12-layer proxy nearly fill an H200.

MFU = tokens/s × moe_train.model.train_flops_per_token(cfg, seq) / peak, for both frameworks, against the
H200's dense bf16 datasheet rate (989 TFLOP/s) and the bf16 matmul rate measured on that machine (792).

Usage (GPU machine): python bench/train_throughput.py [--variants hf,bf16,amp] [--profile bf16] [--attention]
Smoke test on a CPU: python bench/train_throughput.py --tiny --device cpu --variants hf,bf16,amp
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_train.config import ModelConfig  # noqa: E402
from moe_train.model import BalanceLoss, MoEStats, build_model, count_params, train_flops_per_token  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_SPEC = 989.0  # H100/H200 SXM dense bf16, datasheet
PEAK_MEASURED = 792.0  # bf16 matmul 8192^3 measured on the lent H200 (facts-seen-here.md)


def proxy_config(layers: int, tiny: bool) -> ModelConfig:
    """DeepSeek-V2-Lite's shape from configs/model/deepseek_v2_lite.yaml, cut to `layers`, without MTP."""
    with open(os.path.join(ROOT, "configs", "model", "deepseek_v2_lite.yaml"), encoding="utf-8") as f:
        fields = yaml.safe_load(f)
    cfg = ModelConfig(**fields)
    cfg = replace(cfg, num_hidden_layers=layers, num_nextn_predict_layers=0, max_position_embeddings=8192)
    if tiny:  # same structure, small enough for a CPU smoke test
        cfg = replace(
            cfg,
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_attention_heads=4,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
        )
    return cfg


def hf_config(cfg: ModelConfig) -> Any:
    """The same model as transformers' DeepseekV3Config (field names match one to one)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False,
        use_cache=False,
    )


@dataclass
class Variant:
    name: str
    layers: int
    batch: int
    spec: str  # as written in --variants; --profile names these


@dataclass
class Result:
    variant: Variant
    note: str
    tokens_per_s: float = math.nan
    step_ms: float = math.nan
    fwd_ms: float = math.nan
    bwd_ms: float = math.nan
    opt_ms: float = math.nan
    flops_per_token: float = math.nan
    params: int = 0
    peak_gib: float = math.nan
    loss: float = math.nan

    @property
    def tflops(self) -> float:
        return self.tokens_per_s * self.flops_per_token / 1e12


def parse_variants(spec: str, layers: int, batch: int) -> list[Variant]:
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if parts[0] not in ("hf", "bf16", "amp", "bf16c"):
            raise SystemExit(f"--variants: unknown variant {parts[0]!r}; allowed: hf, bf16, amp, bf16c")
        n_layers = int(parts[1]) if len(parts) > 1 else layers
        out.append(Variant(parts[0], n_layers, int(parts[2]) if len(parts) > 2 else batch, item.strip()))
    return out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(
    variant: Variant, cfg: ModelConfig, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[torch.Tensor], torch.Tensor], str]:
    """Model, optimizer, a `loss(tokens)` closure and a note saying what was built."""
    fused = device.type == "cuda"
    if variant.name == "hf":
        from transformers import DeepseekV3ForCausalLM

        hcfg = hf_config(cfg)
        kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
        with torch.device(device):
            try:
                model = DeepseekV3ForCausalLM._from_config(
                    hcfg, experts_implementation="grouped_mm", **kwargs
                )
            except (TypeError, ValueError) as e:  # older transformers: no such setting
                print(f"hf: experts_implementation='grouped_mm' refused ({e}); using its default", flush=True)
                model = DeepseekV3ForCausalLM._from_config(hcfg, **kwargs)
        experts = getattr(model.config, "_experts_implementation", None)
        note = f"attn={model.config._attn_implementation}, experts={experts}"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)

        def hf_loss(tokens: torch.Tensor) -> torch.Tensor:
            # transformers shifts labels itself: labels = the inputs
            inputs = tokens[:, :-1]
            return model(input_ids=inputs, labels=inputs, use_cache=False).loss

        return model, opt, hf_loss, note

    from moe_train.config import OptimConfig
    from moe_train.optim import build_optimizer

    model = build_model(cfg, BalanceLoss("seq", 1e-4), device, seed=0)  # the trainer's default balance term
    if variant.name in ("bf16", "bf16c"):
        for p in model.parameters():  # parameters only: buffers (rotary table, router bias) stay fp32
            p.data = p.data.to(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    amp = variant.name == "amp" and device.type == "cuda"
    note = "fp32 master + bf16 autocast" if variant.name == "amp" else "bf16 weights"
    if variant.name == "bf16c":
        from moe_train.model.compile import compile_phases

        note += f", compiled phases: {compile_phases(model)}"

    def ours_loss(tokens: torch.Tensor) -> torch.Tensor:
        stats = MoEStats()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            out = model(tokens[:, :-1], tokens[:, 1:], stats)
        loss = out.lm_loss
        bal = stats.balance_loss()
        return loss + bal if bal is not None else loss

    return model, opt, ours_loss, note


class Timer:
    """CUDA events on the GPU (no host sync inside the step), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def run_variant(
    variant: Variant, base: ModelConfig, args: argparse.Namespace, device: torch.device
) -> Result:
    cfg = replace(base, num_hidden_layers=variant.layers)
    res = Result(variant, "", flops_per_token=train_flops_per_token(cfg, args.seq))
    res.params = count_params(cfg).total
    free_memory()
    try:
        built = build(variant, cfg, device)
        res.note = built[3]
        measure(res, *built[:3], cfg, args, device)
    except torch.OutOfMemoryError as e:
        res.note = (res.note + "; " if res.note else "") + "OOM: " + str(e).split("\n")[0][:90]
    finally:
        built = None
        free_memory()
    return res


def measure(
    res: Result,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    cfg: ModelConfig,
    args: argparse.Namespace,
    device: torch.device,
) -> None:
    """Warm up, then time `args.steps` steps back to back, with events between the phases of each step."""
    variant = res.variant
    assert cfg.vocab_size is not None
    gen = torch.Generator(device="cpu").manual_seed(1234)  # the same batches for every variant
    shape = (args.accum, variant.batch, args.seq + 1)
    batches = torch.randint(0, cfg.vocab_size, shape, generator=gen).to(device)
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> tuple[Any, list[tuple[Any, Any]], Any, Any, torch.Tensor]:
        """One optimizer step over `args.accum` micro-batches (loss mean over them, as the trainer's)."""
        t0 = timer.mark()
        fwd, total = [], torch.zeros((), device=device)
        for tokens in batches:
            f0 = timer.mark()
            loss = loss_fn(tokens) / args.accum
            fwd.append((f0, timer.mark()))
            loss.backward()
            total += loss.detach()
        t2 = timer.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = timer.mark()
        return t0, fwd, t2, t3, total

    for _ in range(args.warmup):
        step()
    timer.sync()
    marks = [step() for _ in range(args.steps)]
    timer.sync()
    res.step_ms = timer.ms(marks[0][0], marks[-1][3]) / args.steps
    res.fwd_ms = sum(timer.ms(a, b) for m in marks for a, b in m[1]) / args.steps
    res.bwd_ms = sum(timer.ms(m[0], m[2]) for m in marks) / args.steps - res.fwd_ms
    res.opt_ms = sum(timer.ms(m[2], m[3]) for m in marks) / args.steps
    res.tokens_per_s = args.accum * variant.batch * args.seq / (res.step_ms / 1e3)
    res.loss = float(marks[-1][4])
    if device.type == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    if args.profile and variant.spec in args.profile.split(","):
        profile(step, timer, variant, args)


def profile(step: Callable, timer: Timer, variant: Variant, args: argparse.Namespace) -> None:
    """Top device-time ops of two steps; the full table goes to $OUT (or --out)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(2):
            step()
        timer.sync()
    key = "self_cuda_time_total" if timer.cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60)
    path = os.path.join(args.out, f"profile_{variant.name}_L{variant.layers}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=200, max_name_column_width=90))
    print(f"\n### profile {variant.name} (2 steps, top {args.profile_rows} by self device time; {path})")
    print(table, flush=True)


def _time_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    go: torch.Tensor,
    backends: list[Any] | None,
    pad: bool,
    timer: Timer,
    reps: int = 5,
) -> tuple[float, torch.Tensor]:
    """Mean fwd+bwd ms of causal SDPA (optionally with v zero-padded to q's head dim), and its output."""
    from torch.nn.attention import sdpa_kernel

    F = torch.nn.functional
    dqk, dv = q.shape[-1], v.shape[-1]
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

    def once() -> torch.Tensor:
        vin = F.pad(vv, (0, dqk - dv)) if pad else vv
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(qq, kk, vin, is_causal=True, scale=dqk**-0.5)
        o = o[..., :dv] if pad else o
        o.backward(go)
        return o.detach()

    for _ in range(2):
        once()
    timer.sync()
    a = timer.mark()
    for _ in range(reps):
        out = once()
    b = timer.mark()
    timer.sync()
    return timer.ms(a, b) / reps, out


def attention_check(args: argparse.Namespace, device: torch.device) -> str:
    """SDPA for MLA's shapes (q/k head 192, v head 128): which backend runs, and at what speed.

    Flash attention needs equal q/k/v head dims, so a v of 128 beside q/k of 192 is served by another kernel;
    padding v with zeros to 192 lets flash run (the extra columns of the output are sliced off).
    """
    from torch.nn.attention import SDPBackend

    F = torch.nn.functional
    B, H, T, dqk, dv = 2, 16, args.seq, 192, 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=g).to(device, dtype) for d in (dqk, dqk, dv))
    go = torch.randn(B, H, T, dv, generator=g).to(device, dtype)
    names = {m.value: n for n, m in SDPBackend.__members__.items()}
    try:
        chosen = names.get(int(torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=dqk**-0.5)), "?")
        chosen_pad = names.get(
            int(torch._fused_sdp_choice(q, k, F.pad(v, (0, dqk - dv)), None, 0.0, True, scale=dqk**-0.5)), "?"
        )
    except Exception as e:  # private API; informative only
        chosen = chosen_pad = f"? ({type(e).__name__})"
    flops = 3 * 2 * B * H * (T * T / 2) * (dqk + dv)  # the model's convention: causal, fwd+bwd = 3 × fwd
    ref = None
    rows = [
        f"| SDPA case (B={B}, H={H}, T={T}, d_qk={dqk}, d_v={dv}) | fwd+bwd ms | TFLOP/s | max abs diff |",
        "| --- | ---: | ---: | ---: |",
    ]
    cases: list[tuple[str, list[Any] | None, bool]] = [
        (f"default (picks {chosen})", None, False),
        ("EFFICIENT_ATTENTION", [SDPBackend.EFFICIENT_ATTENTION], False),
        ("CUDNN_ATTENTION", [SDPBackend.CUDNN_ATTENTION], False),
        (f"v padded to 192, default (picks {chosen_pad})", None, True),
        ("v padded to 192, FLASH_ATTENTION", [SDPBackend.FLASH_ATTENTION], True),
        ("v padded to 192, CUDNN_ATTENTION", [SDPBackend.CUDNN_ATTENTION], True),
    ]
    timer = Timer(device)
    for label, backends, pad in cases:
        try:
            ms, out = _time_sdpa(q, k, v, go, backends, pad, timer)
            if ref is None:
                ref = out.float()
            diff = (out.float() - ref).abs().max().item()
            rows.append(f"| {label} | {ms:.2f} | {flops / ms / 1e9:.0f} | {diff:.1e} |")
        except Exception as e:  # a backend that refuses the shape is a result, not a failure
            rows.append(f"| {label} | refused: {type(e).__name__}: {str(e).splitlines()[0][:70]} | | |")
    return "\n".join(rows)


def table(results: list[Result], args: argparse.Namespace) -> str:
    head = (
        "| variant | layers | batch | tokens/s | step ms (fwd / bwd / opt) | TFLOP/s | MFU of 989 "
        "| MFU of 792 | peak GiB | params | loss | notes |"
    )
    rows = [head, "|" + " --- |" * 12]
    for r in results:
        v = r.variant
        if math.isnan(r.step_ms):
            rows.append(
                f"| {v.name} | {v.layers} | {v.batch} | – | – | – | – | – | – | {r.params / 1e9:.2f}B | – "
                f"| {r.note} |"
            )
            continue
        rows.append(
            f"| {v.name} | {v.layers} | {v.batch} | {r.tokens_per_s / 1e3:.1f}k | {r.step_ms:.1f} "
            f"({r.fwd_ms:.1f} / {r.bwd_ms:.1f} / {r.opt_ms:.1f}) | {r.tflops:.0f} "
            f"| {100 * r.tflops / PEAK_SPEC:.1f}% | {100 * r.tflops / PEAK_MEASURED:.1f}% | {r.peak_gib:.1f} "
            f"| {r.params / 1e9:.2f}B | {r.loss:.3f} | {r.note} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="hf,bf16,amp", help="comma list of name[:layers[:batch]]")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (accumulation)")
    ap.add_argument("--profile", default="", help="comma list of --variants items to profile after timing")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--attention", action="store_true", help="also time SDPA backends on MLA's head dims")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (CPU smoke test)")
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "train_throughput"),
        help="where the table and profiles go ($OUT on the device machine; never the checkout by default)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    if device.type == "cuda":
        # Only fp32 matmuls are affected (both frameworks' routers compute in fp32): TF32 for both alike.
        torch.backends.cuda.matmul.allow_tf32 = True
    base = proxy_config(args.layers, args.tiny)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "absent"
    header = (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}, "
        f"torch {torch.__version__}, transformers {hf_version}; seq {args.seq}, accumulation {args.accum}, "
        f"warmup {args.warmup}, "
        f"timed steps {args.steps}; "
        f"FLOP/token (L={args.layers}) {train_flops_per_token(base, args.seq) / 1e9:.3f} G"
    )
    print(header, flush=True)
    parts = [header, ""]
    if args.attention:
        att = attention_check(args, device)
        print(att, flush=True)
        parts += [att, ""]
    results = []
    for v in parse_variants(args.variants, args.layers, args.batch):
        t0 = time.perf_counter()
        results.append(run_variant(v, base, args, device))
        took = time.perf_counter() - t0
        print(f"{v.name}:{v.layers}:{v.batch} done in {took:.0f}s: {results[-1].note}", flush=True)
    tab = table(results, args)
    parts.append(tab)
    with open(os.path.join(args.out, "train_throughput.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    print("\n" + header + "\n" + tab, flush=True)


if __name__ == "__main__":
    main()

"""FP8 GEMMs by DeepSeek-V3's recipe against bf16, on the FP8 issue's shapes: kernel check, speed, error.

1. Kernel check: `ops.fp8.fp8_mm` (torch._scaled_mm with block-wise scales on SM90) against `blockwise_mm`,
   the plain-torch reference, for the three GEMMs of a linear (Fprop 1×128 × 128×128, Dgrad the same with
   the transposed weight, Wgrad 1×128 × 1×128 along the tokens), on shapes that are not square.
2. A dense linear 16,384 × 7168 → 7168, forward + backward: bf16 `F.linear` against `fp8_linear` (the casts
   included) with the reference's casts and with the kernel set it picks, and torchao's own blockwise linear
   where installed; each one's relative error against fp32 for y, dx and dw; then each cast and GEMM alone.
3. Routed experts of DeepSeek-V3 shape (hidden 7168, expert width 2048, 32 experts, SwiGLU; 65,536 rows,
   expert i getting rows ∝ 1/√(i+1), fixed seed), forward + backward: bf16 `torch._grouped_mm` (the bf16
   path) against FP8 with the recipe's scaling: the per-expert loop of `fp8_linear` (the reference
   semantics) and `expert_swiglu_fp8` (every cast once over all rows; what FP8 training runs) with a
   GEMM per expert, with the grouped Triton GEMMs (ops/fp8_grouped_triton.py) where Triton runs FP8, and
   with DeepGEMM's grouped GEMMs where `deep_gemm` is installed (ops/fp8_experts.py). `--experts
   H,I,E,ROWS` sets another shape (the V2-Lite proxy's: 2048,1408,64,49152).
   `--grouped` adds torch's `_scaled_grouped_mm` with row-wise scales, forward only, as a raw kernel rate;
   `--profile` prints torch.profiler's top ops for one step of `expert_swiglu_fp8`. `--parts` picks sections.
4. `--parts shapes`: every distinct GEMM shape FP8 runs in a model (`--model`, train.py overrides), its FP8
   and bf16 error against fp32 for y, dx and dw.

Usage (GPU machine): python bench/fp8_gemm.py [--out FILE]    CPU smoke test: --device cpu --tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_train.ops.fp8 as fp8_ops  # noqa: E402
import moe_train.ops.fp8_experts as fp8_experts  # noqa: E402
import moe_train.ops.fp8_grouped_triton as fgt  # noqa: E402
from bench.common import emit, median_ms  # noqa: E402
from moe_train.ops.fp8 import (  # noqa: E402
    blockwise_mm,
    cast_blocks,
    cast_tiles,
    fp8_linear,
    fp8_mm,
    scaled_mm_available,
    swiglu_fp8_cached,
)
from moe_train.ops.grouped_gemm import expert_swiglu_grouped, expert_swiglu_reference  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def kernel_check(device: str, m: int, n: int, k: int) -> list[str]:
    """fp8_mm against the reference for Fprop, Dgrad and Wgrad operand layouts."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).bfloat16()
    w = (torch.randn(n, k, device=device, generator=g) / k**0.5).bfloat16()
    dy = torch.randn(m, n, device=device, generator=g).bfloat16()
    qw, sw = cast_blocks(w)
    cases = {
        "Fprop 1x128 x 128x128": (*cast_tiles(x), qw, sw),
        "Dgrad 1x128 x 128x128": (*cast_tiles(dy), qw.t().contiguous(), sw.t()),
        "Wgrad 1x128 x 1x128": (*cast_tiles(dy.t()), *cast_tiles(x.t())),
    }
    out = [f"| GEMM ({m}×{n}×{k}) | kernel vs reference (rel) | kernel |", "|---|---|---|"]
    for name, (qa, sa, qb, sb) in cases.items():
        ref = blockwise_mm(qa.float(), sa, qb.float(), sb)
        try:
            got = fp8_mm(qa, sa, qb, sb, torch.bfloat16)
            kernel = "_scaled_mm" if scaled_mm_available(qa) else "reference"
            out.append(f"| {name} | {rel(got, ref):.2e} | {kernel} |")
        except Exception as e:  # noqa: BLE001 - a table row says which layout the kernel refused
            out.append(f"| {name} | failed: {str(e).splitlines()[0][:160]} | |")
            traceback.print_exc(limit=2)
    return out


def _operands(device: str, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(m, k, device=device, generator=g)
    return (
        x,
        torch.randn(n, k, device=device, generator=g) / k**0.5,
        torch.randn(m, n, device=device, generator=g),
    )


def _fwd_bwd(fn, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    return (y, *torch.autograd.grad(y, (x, w), dy.to(y.dtype)))


def dense(device: str, m: int, k: int, n: int, iters: int) -> list[str]:
    x0, w0, dy0 = _operands(device, m, k, n)

    def run(fn, x, w):  # noqa: ANN001, ANN202
        return _fwd_bwd(fn, x, w, dy0)

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = run(lambda x, w: x @ w.t(), x0, w0)  # fp32
    xb, wb = x0.bfloat16(), w0.bfloat16()
    rows = [
        f"| dense {m}×{k}→{n}, fwd+bwd | ms | TFLOP/s | y rel | dx rel | dw rel |",
        "|---|---|---|---|---|---|",
    ]
    flops = 6 * m * k * n
    times = {}
    variants = [
        ("bf16 F.linear", F.linear),
        ("fp8 ours, reference casts", _with_reference_casts),
        ("fp8 ours", fp8_linear),
    ]
    ao = _torchao_blockwise()
    if ao is not None and device == "cuda":
        variants.append(("fp8 torchao Float8BlockwiseLinear", ao))
    for name, fn in variants:
        got = run(fn, xb, wb)
        errs = [rel(a, b) for a, b in zip(got, ref, strict=True)]
        times[name] = median_ms(lambda fn=fn: run(fn, xb, wb), iters, 3, device)
        rows.append(
            f"| {name} | {times[name]:.3f} | {flops / times[name] / 1e9:.0f} | "
            + " | ".join(f"{e:.2e}" for e in errs)
            + " |"
        )
    for name in times:
        rows.append(f"| speed-up {name} / bf16 | {times['bf16 F.linear'] / times[name]:.2f}× | | | | |")
    if device == "cuda":
        rows += cast_breakdown(xb, wb, dy0.bfloat16(), iters)
    return rows


def model_shapes(device: str, overrides: list[str], tokens: int) -> list[str]:
    """Every distinct GEMM shape FP8 runs in a model (its eligible linears and its experts' two projections),
    at `tokens` rows: the relative error of y, dx and dw against fp32, in FP8 and in bf16."""
    import dataclasses

    from moe_train.config import load_config, to_object
    from moe_train.model import build_empty_model
    from moe_train.ops.fp8 import fp8_eligible

    cfg = to_object(load_config(overrides)).model
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 257)
    model = build_empty_model(cfg, "meta", torch.bfloat16)
    shapes = {
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and not name.endswith("lm_head")
        and fp8_eligible(m.in_features, m.out_features)
    }
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    if fp8_eligible(h, inter):
        shapes |= {(h, 2 * inter), (inter, h)}
    torch.backends.cuda.matmul.allow_tf32 = False
    out = [
        f"| GEMM K→N at {tokens} tokens ({' '.join(overrides)}) | FP8 y, dx, dw rel | bf16 y, dx, dw rel |",
        "|---|---|---|",
    ]
    for k, n in sorted(shapes):
        x, w, dy = _operands(device, tokens, k, n)
        ref = _fwd_bwd(lambda a, b: a @ b.t(), x, w, dy)
        errs = {
            name: ", ".join(
                f"{rel(a, b):.2e}"
                for a, b in zip(_fwd_bwd(fn, x.bfloat16(), w.bfloat16(), dy), ref, strict=True)
            )
            for name, fn in (("fp8", fp8_linear), ("bf16", F.linear))
        }
        out.append(f"| {k}→{n} | {errs['fp8']} | {errs['bf16']} |")
    return out


def _with_reference_casts(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp8_linear with the reference's compiled casts whatever is installed (for the comparison only)."""
    chosen = fp8_ops.fp8_kernels
    fp8_ops.fp8_kernels = lambda x: fp8_ops.REFERENCE
    try:
        return fp8_linear(x, w)
    finally:
        fp8_ops.fp8_kernels = chosen


def _torchao_blockwise():  # noqa: ANN202 - torchao's blockwise FP8 linear (Triton casts), if installed
    try:
        from torchao.prototype.blockwise_fp8_training.linear import fp8_blockwise_mm
    except Exception as e:  # noqa: BLE001
        print(f"torchao blockwise FP8 not available: {e}")
        return None
    return lambda x, w: fp8_blockwise_mm.apply(x, w, 128, torch.bfloat16, False)


def cast_breakdown(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, iters: int) -> list[str]:
    """Each piece of `fp8_linear`'s forward and backward alone, for every kernel set on this machine, and how
    far each set's casts are from the reference's (E4M3 values that differ, largest scale difference)."""
    sets = [fp8_ops.REFERENCE] + ([fp8_ops._torchao_kernels()] if fp8_ops._torchao_kernels() else [])
    out = [
        "| piece of fp8_linear | " + " | ".join(f"{k.name} ms" for k in sets) + " |",
        "|---" * (len(sets) + 1) + "|",
    ]
    ops = {
        "act(x)": lambda k: k.act(x),
        "act_tokens(x)": lambda k: k.act_tokens(x),
        "act(dy)": lambda k: k.act(dy),
        "act_tokens_t(dy)": lambda k: k.act_tokens_t(dy),
        "weight(w)": lambda k: k.weight(w),
        "weight_t(w)": lambda k: k.weight_t(w),
        "Fprop mm": lambda k, c={}: k.mm(*c.setdefault(k.name, (k.act(x), k.weight(w))), torch.bfloat16),
        "Dgrad mm": lambda k, c={}: k.mm(*c.setdefault(k.name, (k.act(dy), k.weight_t(w))), torch.bfloat16),
        "Wgrad mm": lambda k, c={}: k.mm(
            *c.setdefault(k.name, (k.act_tokens_t(dy), k.act_tokens(x))), torch.bfloat16
        ),
    }
    for name, op in ops.items():
        out.append(
            f"| {name} | "
            + " | ".join(f"{median_ms(lambda k=k, op=op: op(k), iters, 3):.3f}" for k in sets)
            + " |"
        )
    if fgt.runs_on(x.device):  # the grouped Triton kernels on one group: beside cuBLAS's Fprop and Wgrad
        m, k, n = x.shape[0], x.shape[1], w.shape[0]
        one = torch.zeros(m // fp8_ops.TILE, dtype=torch.int32, device=x.device)
        qw, sw = fp8_ops.cast_blocks(w)
        a, b = fp8_ops.cast_tiles(x), (qw.view(1, n, k), sw.view(1, n // fp8_ops.TILE, k // fp8_ops.TILE))
        ends = torch.tensor([0, m], dtype=torch.int32, device=x.device)
        (qt, st), (qx, sx) = fp8_ops.cast_tiles(dy.t()), fp8_ops.cast_tiles(x.t())
        ta, tb = (qt.contiguous(), st), (qx.contiguous(), sx)  # Wgrad's operands run along the tokens
        rows = {
            "Fprop, Triton m-grouped (1 group)": lambda: fgt.m_grouped_mm(*a, *b, one, torch.bfloat16),
            "Wgrad, Triton k-grouped (1 group)": lambda: fgt.k_grouped_mm(
                *ta, *tb, ends[:1], ends[1:], torch.bfloat16
            ),
        }
        for name, op in rows.items():
            out.append(f"| {name} | {median_ms(op, iters, 3):.3f} |" + " |" * (len(sets) - 1))
    if len(sets) > 1:
        ref, got = fp8_ops.REFERENCE.act(x), sets[1].act(x)
        differ = (ref[0].float() != got[0].float()).float().mean().item()
        scale = ((ref[1] - got[1]).abs() / ref[1]).max().item()
        out.append(
            f"| act(x) against the reference | {differ:.2e} of values differ, scales within {scale:.1e} | |"
        )
    return out


def experts(
    device: str,
    hidden: int,
    width: int,
    n_exp: int,
    rows: int,
    iters: int,
    grouped: bool,
    profile: bool = False,
) -> list[str]:
    g = torch.Generator(device=device).manual_seed(2)
    share = torch.tensor([1 / (i + 1) ** 0.5 for i in range(n_exp)])
    counts = (share / share.sum() * rows / 16).floor().long() * 16  # multiples of 16: grouped FP8 kernels
    counts[0] += rows - counts.sum()
    counts = counts.to(device)
    x = torch.randn(rows, hidden, device=device, generator=g).bfloat16()
    wgu = (torch.randn(n_exp, 2 * width, hidden, device=device, generator=g) / hidden**0.5).bfloat16()
    wd = (torch.randn(n_exp, hidden, width, device=device, generator=g) / width**0.5).bfloat16()
    dy = torch.randn(rows, hidden, device=device, generator=g).bfloat16()

    def run(fn):  # noqa: ANN001, ANN202
        leaves = [t.detach().requires_grad_() for t in (x, wgu, wd)]
        y = fn(leaves[0], counts, leaves[1], leaves[2])
        return (y, *torch.autograd.grad(y, leaves, dy))

    bf16 = expert_swiglu_grouped if device == "cuda" else expert_swiglu_reference

    def fp8_loop(x, c, a, b):  # noqa: ANN001, ANN202 - the semantics the grouped path is held to
        return expert_swiglu_reference(x, c, a, b, linear=fp8_linear)

    def fp8_with(kernel: str):  # noqa: ANN202 - what FP8 training runs, with the grouped linear's kernel named
        return lambda x, c, a, b: fp8_experts.expert_swiglu_fp8(x, c, a, b, swiglu_fp8_cached, kernel=kernel)

    fp8 = fp8_with("auto")
    deep_gemm = fp8_experts.deep_gemm_available(x, hidden, 2 * width, width)

    flops = 6 * rows * 3 * hidden * width
    out = [
        f"| experts {n_exp}×({hidden}→2×{width}→{hidden}), {rows} rows, fwd+bwd | ms | TFLOP/s | y rel |"
        " y, dx, dw rel to the grouped per-expert GEMMs |",
        "|---|---|---|---|---|",
    ]
    ref = run(bf16)
    times = {}
    variants = [
        ("bf16 grouped_mm", bf16),
        ("fp8 per-expert loop", fp8_loop),
        ("fp8 grouped casts, a GEMM per expert", fp8_with("per_expert")),
    ]
    if fp8_experts.fp8_experts_on_device(x.device):
        variants.append(("fp8 grouped casts, Triton grouped GEMMs", fp8_with("triton")))
    if deep_gemm:
        variants.append(("fp8 grouped casts, DeepGEMM grouped GEMMs", fp8_with("deep_gemm")))
    if device == "cuda":
        try:
            from torchao.prototype.moe_training.fp8_grouped_mm import (
                _to_fp8_rowwise_then_scaled_grouped_mm as gmm,
            )

            def ao_rowwise(x, c, a, b):  # noqa: ANN001, ANN202 - row-wise scales: coarser than the recipe
                offs = torch.cumsum(c, 0).to(torch.int32)
                g, u = gmm(x, a.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False).chunk(
                    2, dim=-1
                )
                return gmm(F.silu(g) * u, b.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False)

            variants.append(("fp8 torchao row-wise grouped", ao_rowwise))
        except Exception as e:  # noqa: BLE001
            print(f"torchao grouped FP8 not available: {e}")
    same = None  # the grouped casts with a GEMM per expert: the FP8 values every grouped kernel must match
    for name, fn in variants:
        try:
            got = run(fn)
            times[name] = median_ms(lambda fn=fn: run(fn), iters, 1, device)
        except Exception as e:  # noqa: BLE001 - a row says what failed
            out.append(f"| {name} | failed: {str(e).splitlines()[0][:160]} | | | |")
            continue
        same = got if name.endswith("a GEMM per expert") else same
        pairs = [] if same is None else zip(got, same, strict=True)
        to_same = ", ".join(f"{rel(a, b):.1e}" for a, b in pairs)
        err, rate = rel(got[0], ref[0]), flops / times[name] / 1e9
        out.append(f"| {name} | {times[name]:.2f} | {rate:.0f} | {err:.2e} | {to_same} |")
    for name in times:
        out.append(f"| speed-up {name} / bf16 | {times['bf16 grouped_mm'] / times[name]:.2f}× | | | |")
    if grouped and device == "cuda":
        out += scaled_grouped(x, wgu, counts, iters)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profiler(activities=activities) as p:
            run(fp8)
            if device == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(p.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60))
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return out


def scaled_grouped(x: torch.Tensor, wgu: torch.Tensor, counts: torch.Tensor, iters: int) -> list[str]:
    """The gate-up projection's forward alone: bf16 `_grouped_mm` against row-wise `_scaled_grouped_mm`."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows, hidden = x.shape
    n = wgu.shape[1]
    flops = 2 * rows * hidden * n
    out = []
    t = median_ms(lambda: torch._grouped_mm(x, wgu.transpose(-2, -1), offs=offs), iters, 3)
    out.append(f"| gate-up fwd, bf16 _grouped_mm | {t:.3f} | {flops / t / 1e9:.0f} | |")
    try:
        xs = x.float().abs().amax(-1).clamp_min(1e-12) / 448
        qx = (x.float() / xs[:, None]).to(torch.float8_e4m3fn)
        ws = wgu.float().abs().amax(-1).clamp_min(1e-12) / 448  # [E, N]: one scale per output column
        qw = (wgu.float() / ws[..., None]).to(torch.float8_e4m3fn)
        fn = lambda: torch._scaled_grouped_mm(  # noqa: E731
            qx, qw.transpose(-2, -1), xs, ws, offs=offs, out_dtype=torch.bfloat16
        )
        y = fn()
        ref = torch._grouped_mm(x, wgu.transpose(-2, -1), offs=offs)
        t8 = median_ms(fn, iters, 3)
        name = "gate-up fwd, row-wise _scaled_grouped_mm"
        out.append(f"| {name} | {t8:.3f} | {flops / t8 / 1e9:.0f} | {rel(y, ref):.2e} |")
    except Exception as e:  # noqa: BLE001
        out.append(f"| row-wise _scaled_grouped_mm | failed: {str(e).splitlines()[0][:160]} | | |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--grouped", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one step of expert_swiglu_fp8")
    ap.add_argument(
        "--parts", default="check,dense,experts", help="comma-separated: check, dense, experts, shapes"
    )
    ap.add_argument(
        "--model", default="model=deepseek_v2_lite model.num_hidden_layers=6", help="for --parts shapes"
    )
    ap.add_argument("--experts", help="H,I,E,ROWS: hidden, expert width, experts, rows (default V3's)")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = a.device
    lines = [f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}"]
    if a.tiny:
        shapes = {"check": (256, 384, 512), "dense": (256, 256, 384, 2), "experts": (256, 128, 4, 512, 2)}
    else:
        shapes = {"check": (1024, 1536, 2048), "dense": (16384, 7168, 7168, a.iters)}
        shapes["experts"] = (7168, 2048, 32, 65536, a.iters)
    if a.experts:
        shapes["experts"] = (*(int(v) for v in a.experts.split(",")), shapes["experts"][-1])
    parts = a.parts.split(",")
    if "check" in parts:
        lines += kernel_check(dev, *shapes["check"])
    if "dense" in parts:
        lines += dense(dev, *shapes["dense"])
    if "experts" in parts:
        lines += experts(dev, *shapes["experts"], a.grouped, a.profile)
    if "shapes" in parts:
        lines += model_shapes(dev, a.model.split(), 256 if a.tiny else 8192)
    emit(lines, a.out)


if __name__ == "__main__":
    main()

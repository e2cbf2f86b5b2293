"""Grouped-GEMM expert SwiGLU on the GPU: correctness against fp32 and speed against the per-expert loop.

Why this exists: on CPU the tests can only compare forwards (CPU `torch._grouped_mm` has no working backward),
so the CUDA bf16 path that every GPU run trains through needs its own check of forward *and* backward,
with uneven expert loads including experts that receive no rows (offsets that repeat), the case a
grouped kernel is most likely to get wrong.

For each shape it runs, on the same random inputs:
  grouped bf16       expert_swiglu_grouped, bf16 activations and weights (the bf16-weights path)
  grouped autocast   expert_swiglu_grouped, fp32 weights under bf16 autocast (the trainer's default path)
  loop bf16          expert_swiglu_reference in bf16 (what bf16 rounding alone costs, for scale)
and compares output, input grad and both weight grads with expert_swiglu_reference in fp32 (TF32 off).
Asserted: every relative error ‖a − ref‖/‖ref‖ ≤ TOL (bf16 operands land between 1e-3 and 1e-2), all finite,
and weight grads of zero-row experts exactly zero.

Usage (GPU machine): python bench/grouped_gemm_check.py    (CPU: --device cpu runs the loop paths only)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_train.ops.grouped_gemm import expert_swiglu_grouped, expert_swiglu_reference  # noqa: E402

TOL = 1e-2  # relative Frobenius error against fp32, bf16 operands


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    hidden: int
    inter: int
    rows: int
    zero: int  # experts given no rows


SHAPES = [
    # the 12-layer DeepSeek-V2-Lite proxy's MoE layer: 8192 tokens x top-6 over 64 experts
    Shape("V2-Lite proxy", 64, 2048, 1408, 8192 * 6, 3),
    # a DeepSeek-V3 layer's experts on one of 8 EP ranks: 32 of 256 experts, hidden 7168, inter 2048
    Shape("V3 EP-8 slice", 32, 7168, 2048, 16384, 3),
]


def uneven_counts(s: Shape, g: torch.Generator) -> torch.Tensor:
    """Skewed loads (log-normal affinities), `s.zero` experts with none; rows sum to s.rows."""
    p = torch.randn(s.experts, generator=g).mul(0.8).exp()
    p[torch.randperm(s.experts, generator=g)[: s.zero]] = 0
    picks = torch.multinomial(p, s.rows, replacement=True, generator=g)
    return torch.bincount(picks, minlength=s.experts)


def errors(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = a.double() - ref.double()
    return d.abs().max().item(), (d.norm() / ref.double().norm()).item()


def run_path(
    fn: Callable,
    x: torch.Tensor,
    counts: torch.Tensor,
    wgu: torch.Tensor,
    wd: torch.Tensor,
    go: torch.Tensor,
    dtype: torch.dtype,
    autocast: bool,
) -> dict[str, torch.Tensor]:
    """Forward and backward of `fn` on copies of the inputs in `dtype`; returns output and the three grads."""
    xs, wgus, wds = (t.detach().to(dtype).requires_grad_() for t in (x, wgu, wd))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = fn(xs, counts, wgus, wds)
    out.backward(go.to(out.dtype))
    assert xs.grad is not None and wgus.grad is not None and wds.grad is not None
    return {"out": out.detach(), "dx": xs.grad, "dW_gate_up": wgus.grad, "dW_down": wds.grad}


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def check_shape(s: Shape, device: torch.device, seed: int, reps: int) -> tuple[list[str], list[str], bool]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    counts_cpu = uneven_counts(s, g)
    counts = counts_cpu.to(device)
    std = 0.02
    x = torch.randn(s.rows, s.hidden, generator=g).to(device)
    wgu = (torch.randn(s.experts, 2 * s.inter, s.hidden, generator=g) * std).to(device)
    wd = (torch.randn(s.experts, s.hidden, s.inter, generator=g) * std).to(device)
    go = torch.randn(s.rows, s.hidden, generator=g).to(device)
    on_gpu = device.type == "cuda"
    ref = run_path(expert_swiglu_reference, x, counts, wgu, wd, go, torch.float32, False)
    paths: list[tuple[str, Callable, torch.dtype, bool]] = []
    if on_gpu:
        paths += [
            ("grouped bf16", expert_swiglu_grouped, torch.bfloat16, False),
            ("grouped autocast", expert_swiglu_grouped, torch.float32, True),
        ]
    paths.append(("loop bf16", expert_swiglu_reference, torch.bfloat16, False))
    zero = (counts_cpu == 0).nonzero().flatten().tolist()
    label = (
        f"{s.name}: E={s.experts}, H={s.hidden}, I={s.inter}, rows={s.rows}, rows/expert "
        f"{int(counts_cpu.min())}..{int(counts_cpu.max())}, zero-row experts {zero}"
    )
    acc = [f"| {label} | | | | |"]
    ok_all = True
    for name, fn, dtype, autocast in paths:
        got = run_path(fn, x, counts, wgu, wd, go, dtype, autocast)
        for key, r in ref.items():
            mx, rel = errors(got[key], r)
            finite = bool(torch.isfinite(got[key]).all())
            ok = finite and rel <= TOL
            if key.startswith("dW") and zero:
                ok = ok and bool((got[key][zero] == 0).all())
            ok_all &= ok
            acc.append(f"| {name} | {key} | {mx:.2e} | {rel:.2e} | {'ok' if ok else 'FAIL'} |")
        del got
    # timing, bf16 inputs, leaf tensors reused across repetitions
    flops_fwd = 6 * s.rows * s.hidden * s.inter
    timing = []
    xb, wgub, wdb = (t.detach().bfloat16().requires_grad_() for t in (x, wgu, wd))
    gob = go.bfloat16()
    timed = [("loop bf16", expert_swiglu_reference)]
    if on_gpu:
        timed.insert(0, ("grouped bf16", expert_swiglu_grouped))
    for name, fn in timed:

        def fwd(fn: Callable = fn) -> object:
            with torch.no_grad():
                return fn(xb, counts, wgub, wdb)

        def fwd_bwd(fn: Callable = fn) -> object:
            out = fn(xb, counts, wgub, wdb)
            out.backward(gob)
            return out

        f_ms = median_ms(fwd, device, reps)
        fb_ms = median_ms(fwd_bwd, device, reps)
        timing.append(
            f"| {s.name} | {name} | {f_ms:.2f} | {flops_fwd / f_ms / 1e9:.0f} | {fb_ms:.2f} "
            f"| {3 * flops_fwd / fb_ms / 1e9:.0f} |"
        )
    return acc, timing, ok_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every dimension (CPU smoke test: 0.05)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False
    shapes = SHAPES
    if args.scale != 1.0:

        def shrink(n: int) -> int:
            return max(8, int(n * args.scale) // 8 * 8)

        shapes = [
            Shape(
                s.name,
                s.experts,
                shrink(s.hidden),
                shrink(s.inter),
                max(s.experts, int(s.rows * args.scale)),
                s.zero,
            )
            for s in shapes
        ]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    acc = [
        f"Errors against expert_swiglu_reference in fp32 (TF32 off), {dev}, torch {torch.__version__}; "
        f"asserted: rel ≤ {TOL:g}, finite, zero-row experts' weight grads exactly 0",
        "",
        "| path | tensor | max abs err | rel err ‖a−ref‖/‖ref‖ | check |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    timing = [
        "| shape | path | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    ok_all = True
    for i, s in enumerate(shapes):
        a, t, ok = check_shape(s, device, seed=100 + i, reps=args.reps)
        acc += a
        timing += t
        ok_all &= ok
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(acc) + "\n\n" + "\n".join(timing) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grouped_gemm_check.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text, flush=True)
    assert ok_all, "grouped GEMM check FAILED (see the table)"
    print("grouped GEMM check passed", flush=True)


if __name__ == "__main__":
    main()

"""The memory-bound ops of a training step, each as moe_train runs it against the fused candidates: time
(forward plus backward) and error against an fp32 reference, on the V2-Lite proxy's shapes.

Candidates per op (the single-GPU speed issue: prefer a maintained library, decide by measurement):
  ours      the op as the model runs it in training (ops/fused.py, ops/cross_entropy.py)
  plain     its plain PyTorch form, the CPU path (for cross-entropy: bf16 logits, an fp32 copy,
            F.cross_entropy)
  compiled  torch.compile of our op (what torchtitan does per block)
  torch     a fused op of torch itself where one exists (F.rms_norm)
  liger     Liger-Kernel's Triton op (RMSNorm, SiLU-mul, fused linear cross-entropy); RoPE is not offered:
            Liger rotates halves (rotate_half), DeepSeek's RoPE rotates interleaved pairs
Error: max |output − fp32 reference| and max |input gradient − fp32 reference|, the reference computed in
fp32 from the same bf16 inputs; "err ×" is that error over the `plain` op's (the acceptance: ≤ 1.5).

Usage (GPU machine, Liger-Kernel's wheel in .whl/):
  python bench/fused_ops.py [--ops rmsnorm,rmsnorm32,swiglu,rope,ce]   (rmsnorm32: an fp32 gain)
CPU smoke test: python bench/fused_ops.py --device cpu --tiny --variants ours,plain
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import median_ms  # noqa: E402
from moe_train.model.norm import RMSNorm  # noqa: E402
from moe_train.model.rope import RotaryTable  # noqa: E402
from moe_train.ops.cross_entropy import linear_cross_entropy  # noqa: E402
from moe_train.ops.fused import (  # noqa: E402
    rms_norm_plain,
    rotate_pairs_plain,
    swiglu_act,
    swiglu_plain,
)


def _liger(name: str):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return {
        "rms": LigerRMSNormFunction,
        "silu_mul": LigerSiLUMulFunction,
        "flce": LigerFusedLinearCrossEntropyLoss,
    }[name]


def candidates(op: str, shapes: dict, device: str) -> tuple[list[torch.Tensor], dict[str, Callable]]:
    """The op's bf16 inputs (leaves needing grad) and {variant: fn(*inputs) -> output}."""
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).bfloat16().requires_grad_()

    T, h = shapes["tokens"], shapes["hidden"]
    if op in ("rmsnorm", "rmsnorm32"):  # rmsnorm32: an fp32 gain on bf16 input, as under fp32 masters
        eps = 1e-6

        def ours(x, w):  # the model's RMSNorm.compute, its weight and eps given
            return RMSNorm.compute(SimpleNamespace(weight=w, eps=eps), x)

        fns = {
            "ours": ours,
            "plain": lambda x, w: rms_norm_plain(x, w, eps),
            "compiled": torch.compile(lambda x, w: rms_norm_plain(x, w, eps)),
            "torch": lambda x, w: F.rms_norm(x, (h,), w, eps),
            "liger": lambda x, w: _liger("rms").apply(x, w, eps, 0.0, "llama", False),
        }
        gain = 1 + 0.1 * torch.randn(h, device=device, generator=g)
        gain = gain if op == "rmsnorm32" else gain.bfloat16()
        return [leaf(T, h), gain.requires_grad_()], fns
    if op == "swiglu":
        rows, inter = T * shapes["topk"], shapes["moe_inter"]
        return [leaf(rows, inter), leaf(rows, inter)], {
            "ours": swiglu_act,
            "plain": swiglu_plain,
            "compiled": torch.compile(swiglu_plain),
            "liger": lambda a, b: _liger("silu_mul").apply(a, b),
        }
    if op == "rope":
        table = RotaryTable(shapes["rope"], shapes["seq"], 10000.0, None).to(device)
        B = T // shapes["seq"]
        return [leaf(B, shapes["heads"], shapes["seq"], shapes["rope"])], {
            "ours": table,
            "plain": lambda x: rotate_pairs_plain(x, table.cos[: x.shape[-2]], table.sin[: x.shape[-2]]),
            "compiled": torch.compile(
                lambda x: rotate_pairs_plain(x, table.cos[: x.shape[-2]], table.sin[: x.shape[-2]])
            ),
        }
    if op == "ce":
        V = shapes["vocab"]
        labels = torch.randint(0, V, (T,), device=device, generator=g)

        def plain(x, w):
            return F.cross_entropy((x @ w.t()).float(), labels)

        def liger(x, w):
            return _liger("flce")()(w, x, labels)

        return [leaf(T, h), leaf(V, h, scale=h**-0.5)], {
            "plain": plain,
            "ours": lambda x, w: linear_cross_entropy(x, w, labels)[0],
            "liger": liger,
        }
    raise ValueError(op)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ops", default="rmsnorm,rmsnorm32,swiglu,rope,ce")
    ap.add_argument("--variants", default="ours,plain,compiled,torch,liger")
    ap.add_argument("--tiny", action="store_true", help="small shapes, for a CPU smoke test")
    a = ap.parse_args()
    shapes = dict(tokens=8192, seq=4096, hidden=2048, heads=16, rope=64, topk=6, moe_inter=1408, vocab=102400)
    if a.tiny:
        shapes = dict(tokens=64, seq=32, hidden=64, heads=2, rope=16, topk=2, moe_inter=48, vocab=300)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, shapes {shapes}")
    print("| op | variant | fwd+bwd ms | vs plain | max err out | err × | max err grad | err × |")
    print("|---|---|---|---|---|---|---|---|")
    wanted = a.variants.split(",")
    for op in a.ops.split(","):
        inputs, fns = candidates(op, shapes, a.device)
        ref_in = [x.detach().float().requires_grad_() for x in inputs]
        plain_name = "plain" if "plain" in fns else "ours"
        with torch.no_grad():
            probe = fns[plain_name](*inputs)
        go = torch.randn(probe.shape, device=a.device, generator=torch.Generator(a.device).manual_seed(1))
        ref_fn = fns[plain_name]
        ref_out = ref_fn(*ref_in)
        ref_grads = torch.autograd.grad(ref_out, ref_in, go.to(ref_out.dtype))
        base_err = base_ms = None
        for variant in [plain_name] + [v for v in fns if v != plain_name]:
            if variant not in wanted:
                continue
            fn = fns[variant]
            try:
                out = fn(*inputs)
                grads = torch.autograd.grad(out, inputs, go.to(out.dtype))
            except Exception as e:  # noqa: BLE001 - a missing library or kernel is a row, not a crash
                print(f"| {op} | {variant} | not run: {type(e).__name__}: {str(e)[:80]} | | | | | |")
                continue
            err_out = (out.float() - ref_out.float()).abs().max().item()
            err_grad = max(
                (gr.float() - r).abs().max().item() for gr, r in zip(grads, ref_grads, strict=True)
            )

            def step(fn=fn, inputs=inputs, go=go):
                o = fn(*inputs)
                torch.autograd.grad(o, inputs, go.to(o.dtype))

            ms = median_ms(step, 10, 5, a.device)
            if base_err is None:
                base_err, base_ms = (err_out, err_grad), ms
            print(
                f"| {op} | {variant} | {ms:.3f} | {ms / base_ms:.2f} | {err_out:.2e} | "
                f"{err_out / max(base_err[0], 1e-30):.2f} | {err_grad:.2e} | "
                f"{err_grad / max(base_err[1], 1e-30):.2f} |"
            )


if __name__ == "__main__":
    main()

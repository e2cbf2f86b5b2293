"""The memory-bound elementwise ops of a training step, fused on CUDA, with their plain PyTorch form as the
CPU path and the semantics the GPU path is held to (bench/fused_ops.py measured the candidates; the choice is
recorded in docs/architecture.md, "Fused ops").

- `rms_norm`: torch's own fused RMSNorm (`F.rms_norm`, fp32 math inside) where input and weight share a
  dtype on CUDA; otherwise (fp32 gains on bf16 activations, the fp32-master default) the plain expression,
  compiled like the next two.
- `swiglu_act`, `rotate_pairs`: `torch.compile` of the plain expression on CUDA while autograd records (the
  training step), so the fp32 intermediates and the strided halves live in registers instead of memory. Under
  no_grad (evaluation, decode, and the CUDA graphs decode captures) the plain form runs: nothing compiles
  during a capture, and decode's shapes change every step.

`compiled_on_cuda` is the compile-on-CUDA rule these follow (ops/cross_entropy.py uses it too, for its
chunk's elementwise step). Compiled kernels are deterministic for fixed shapes; torch's RMSNorm kernels are
its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def rms_norm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / rms(x), computed in fp32 whatever x's dtype, rounded once to x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_plain`'s result: torch's fused kernel on CUDA where x and the gain share a dtype; where they
    don't (an fp32 gain on bf16 activations, as under fp32 masters) torch's kernel refuses, and its fallback
    runs unfused, so the plain expression is compiled instead."""
    if x.is_cuda and x.dtype == weight.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _rms_norm_mixed(x, weight, eps)


def swiglu_plain(gate: torch.Tensor, up: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate)·up; with `gates` ((rows,) fp32, a routed row's gate weight) also times each row's gate, in
    fp32 (fp64 for fp64 rows) and rounded once. The routed experts weigh their rows here, inside a pass the
    activation makes anyway, so that the combine is a plain sum and its backward a plain gather: the gate's
    gradient is a row reduction of this op's backward instead of a pass of dot products over the N·k rows."""
    if gates is None:
        return F.silu(gate) * up
    acc = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc) * gates.to(acc).unsqueeze(-1)).to(gate.dtype)


def rotate_pairs_plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x's last dim by the angles whose cos/sin ([..., dim/2], fp32)
    are given; fp32 math, rounded once to x's dtype."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def compiled_on_cuda(plain: Callable[..., Any], training_only: bool = True) -> Callable[..., Any]:
    """`plain`, or its compiled form (compiled on first use) when its first argument is a CUDA tensor — and,
    with `training_only`, autograd records. The one home of the ops/ package's compile-on-CUDA rule."""
    compiled = functools.cache(lambda: torch.compile(plain))

    @functools.wraps(plain)
    def op(x: torch.Tensor, *rest: Any) -> Any:
        if x.is_cuda and (torch.is_grad_enabled() or not training_only):
            return compiled()(x, *rest)
        return plain(x, *rest)

    return op


swiglu_act = compiled_on_cuda(swiglu_plain)
_rms_norm_mixed = compiled_on_cuda(rms_norm_plain)
rotate_pairs = compiled_on_cuda(rotate_pairs_plain)

"""Expert SwiGLU over tokens already sorted by expert: one grouped GEMM per projection.

On CUDA (bf16) `torch._grouped_mm` runs all experts in one kernel.  On CPU the reference path loops over
experts: CPU `_grouped_mm` has a forward (for 16-byte-aligned shapes) but no working backward, and the loop
is the semantics the GPU path is tested against (tests compare the two forwards on CPU;
bench/grouped_gemm_check.py compares forward and backward in bf16 on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .fp8 import fp8_linear
from .fp8_experts import expert_swiglu_fp8, fp8_experts_on_device
from .fused import swiglu_act

# (projection output, its weight) pairs a caller may ask for: a deferred weight-gradient pass starts from
# these outputs' gradients, so it runs only the weight-gradient GEMMs (parallel/overlap.py, `SubStep`).
Taps = list[tuple[torch.Tensor, torch.Tensor]]
# act(gate, up, gates): silu(gate)·up, times each row's gate weight where gates ((rows,) fp32) is given
Activation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, weight [out, in]) -> x @ weight.T


def grouped_mm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def expert_swiglu_grouped(
    x: torch.Tensor,
    counts: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Activation = swiglu_act,
    taps: Taps | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (M, H) sorted by expert; counts: (E,) rows per expert; w_gate_up: (E, 2I, H); w_down: (E, H, I).

    act: `Activation`; the model passes a checkpointed one for selective recomputation.
    taps: receives (projection output, weight) for both projections.
    gates: (M,) each row's gate weight, applied inside the activation (None: unweighted rows).
    """
    dtype = _compute_dtype(x)
    if x.is_cuda and dtype != torch.bfloat16:
        raise ValueError(f"torch._grouped_mm needs bf16 inputs on CUDA, got {dtype}")
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xa = x.to(dtype)
    gu = torch._grouped_mm(xa, w_gate_up.to(dtype).transpose(-2, -1), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    h = act(g, u, gates)
    y = torch._grouped_mm(h, w_down.to(dtype).transpose(-2, -1), offs=offs)
    if taps is not None:
        taps += [(gu, w_gate_up), (y, w_down)]
    return y


def expert_swiglu_reference(
    x: torch.Tensor,
    counts: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Activation = swiglu_act,
    taps: Taps | None = None,
    linear: Linear = F.linear,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same math as `expert_swiglu_grouped`, one matmul pair per expert (host reads `counts`); `linear`
    computes each product (with `ops.fp8.fp8_linear`: the per-expert semantics `expert_swiglu_fp8` is held
    to)."""
    outs = []
    found: Taps = []
    # unbind, not w[e] per expert: a select's backward writes a zero tensor of the whole weight stack, so E
    # selects cost E whole stacks of writes; unbind's backward stacks the E expert gradients once
    gate_ups, downs = w_gate_up.unbind(0), w_down.unbind(0)
    sizes = counts.tolist()
    row_gates = [None] * len(sizes) if gates is None else torch.split(gates, sizes)
    for e, xe in enumerate(torch.split(x, sizes, dim=0)):
        if xe.shape[0] == 0:
            continue
        gu = linear(xe, gate_ups[e])
        g, u = gu.chunk(2, dim=-1)
        outs.append(linear(act(g, u, row_gates[e]), downs[e]))
        found += [(gu, w_gate_up), (outs[-1], w_down)]
    if not outs:
        # Keep the graph connected to the weights (every expert gets a zero gradient) and to x: under
        # expert parallelism x arrived by an all-to-all whose backward every rank must run, tokens or not.
        held = x.sum() + w_gate_up.sum() + w_down.sum() + (0 if gates is None else gates.sum())
        y = x.new_zeros(0, w_down.shape[1]) + 0 * held
        found = [(y, w_gate_up), (y, w_down)]
    else:
        y = torch.cat(outs, dim=0)
    if taps is not None:
        taps += found
    return y


def expert_swiglu(
    x: torch.Tensor,
    counts: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    impl: str = "auto",
    act: Activation = swiglu_act,
    taps: Taps | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """impl: auto (grouped on CUDA, reference elsewhere) | grouped | reference | fp8 (both projections as FP8
    GEMMs by DeepSeek-V3's recipe, `ops.fp8_experts.expert_swiglu_fp8`, on any device; on an FP8 GPU with
    Triton every index stays on the device).

    x may end in padding rows past the counts' sum (a fixed-size buffer, parallel/dispatch/bounded.py): the
    grouped GEMM never computes them, and the paths that read the counts on the host give them zero rows.
    """
    if impl == "grouped" or (
        impl == "auto" and grouped_mm_available(x) and _compute_dtype(x) == torch.bfloat16
    ):
        return expert_swiglu_grouped(x, counts, w_gate_up, w_down, act, taps, gates)
    if impl == "fp8" and fp8_experts_on_device(x.device):  # takes the tail rows itself, no host read
        return expert_swiglu_fp8(x, counts, w_gate_up, w_down, act, taps, gates)
    used = int(counts.sum())  # these paths read the counts on the host anyway
    rows, tail = x[:used] if used < x.shape[0] else x, x.shape[0] - used
    if gates is not None:
        gates = gates[:used]
    if impl != "fp8":
        y = expert_swiglu_reference(rows, counts, w_gate_up, w_down, act, taps, gates=gates)
    elif rows.shape[0] == 0:  # the loop keeps every weight in the graph, as expert parallelism needs
        y = expert_swiglu_reference(rows, counts, w_gate_up, w_down, act, taps, fp8_linear, gates)
    else:
        y = expert_swiglu_fp8(rows, counts, w_gate_up, w_down, act, taps, gates)
    return torch.cat([y, y.new_zeros(tail, y.shape[1])]) if tail else y

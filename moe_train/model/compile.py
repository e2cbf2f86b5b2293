"""`trainer.compile=phases`: torch.compile each block's phase callables, as torchtitan compiles per block.

A block is a program of phases (model/phases.py), and the runners — the eager one, the overlap engine,
inference — call each phase's callable by attribute. Compiling those callables in place therefore compiles
the same code for every runner, with no change to the program: attention with its norms and residual, the
block's finish and the dense MLP (bound methods, replaced on the instance), and the router, the shared and
the routed experts (modules, compiled in place by `nn.Module.compile`, which keeps parameter names, so
checkpoints, optimizer groups and HF conversion see nothing). The dispatch phases stay eager: they hold the
collectives and the row plans the overlap engine splits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.direct_experts import direct_rows
from .moe import MoE, RoutedExperts
from .transformer import DecoderLayer

METHODS = ("attention", "finish", "_dense")  # DecoderLayer's phase callables
MODULES = ("gate", "shared_experts", "experts")  # MoE's phase modules


def compile_mode(setting: str, device: torch.device, fp8: bool = False) -> str:
    """What `trainer.compile` means on `device`: `auto` becomes `phases` on CUDA, where Inductor's fused
    kernels take the step's many small memory-bound ops off a step that is replayed from a CUDA graph, and
    `none` elsewhere (on CPU compiling costs more than it saves in short runs and tests, and the CPU
    experts' loop reads its row counts on the host, which recompiles a phase for every new set of counts)
    and under FP8 training (`fp8`: its quantising linears and grouped Triton experts have not been run
    compiled on a GPU; `phases` asks for it); any other value stands as given.
    Evaluation compiles each phase once more (no gradients: another graph)."""
    if setting != "auto":
        return setting
    return "phases" if device.type == "cuda" and not fp8 else "none"


def compile_phases(model: nn.Module, direct_experts: bool = False, tuned: bool = False) -> int:
    """Compile every block's phase callables in `model`, in place; returns how many were compiled.

    direct_experts: MoE layers of few token rows (decode) compute each chosen expert straight from its
    weights (`RoutedExperts.direct`, ops/direct_experts.py), up to `direct_rows` rows; its two stages are
    compiled apart, so the activation between them is written once. One process, every expert local.
    tuned: Inductor tunes each generated GPU kernel's launch by coordinate descent (a longer compile): a
    decode step is dozens of small reductions and GEMVs whose default tiles leave bandwidth unused."""
    options = {"coordinate_descent_tuning": True} if tuned else None
    n = 0
    for m in model.modules():
        if isinstance(m, DecoderLayer):
            for name in METHODS:
                setattr(m, name, torch.compile(getattr(m, name), dynamic=False, options=options))
                n += 1
        elif isinstance(m, MoE):
            for name in MODULES:
                sub = getattr(m, name, None)
                if sub is not None:
                    sub.compile(dynamic=False, options=options)
                    n += 1
            if direct_experts:
                if not isinstance(m.experts, RoutedExperts) or m.experts.num_local != m.n_experts:
                    raise ValueError(
                        "direct_experts needs every routed expert in this process, resident (no expert "
                        "parallelism, no offloaded experts)"
                    )
                for name in ("direct_hidden", "direct_down"):
                    stage = getattr(m.experts, name)
                    setattr(m.experts, name, torch.compile(stage, dynamic=False, options=options))
                    n += 1
                m.direct_rows = direct_rows(m.n_experts, m.gate.top_k)
    return n

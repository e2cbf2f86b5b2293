"""Activation recomputation (`trainer.recompute`): trade backward-pass compute for activation memory.

Modes:
  none       keep every activation autograd saves.
  selective  recompute only the cheap, memory-heavy pieces DeepSeek-V3 recomputes: RMSNorms (their fp32
             intermediates), MLA's up-projections behind the latent norms (q_b_proj∘q_a_layernorm,
             kv_b_proj∘kv_a_layernorm) and the SwiGLU activation silu(gate)·up (dense MLP, shared and
             routed experts). Each is a small `checkpoint` region: its inputs stay saved, its internals
             are recomputed in backward.
  full       checkpoint whole decoder blocks (MTP blocks included): only each block's input survives the
             forward; the block runs again inside backward.

Modules opt in by inheriting `Recomputable`; `set_recompute` sets the mode on every such module, so the
mode lives on the modules (no global state) and a pipeline rank's partial model is configured the same way.
This module imports nothing from the model so that every model file may import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


class Recomputable:
    """Mixin: a module whose forward consults `self.recompute` (one of MODES)."""

    recompute: str = "none"


def set_recompute(model: nn.Module, mode: str) -> None:
    """Set the recomputation mode on every recompute-aware module of `model`."""
    if mode not in MODES:
        raise ValueError(f"recompute mode must be one of {MODES}, not {mode!r}")
    for m in model.modules():
        if isinstance(m, Recomputable):
            m.recompute = mode


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread — i.e. when a checkpointed forward is
    being recomputed. Side effects of a forward (router statistics) must then not be repeated.

    `torch._C._current_graph_task_id` is what `torch.utils.checkpoint` itself uses to key recomputations;
    it returns -1 outside a backward (present in torch 2.11 and 2.13).
    """
    return torch._C._current_graph_task_id() != -1


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), under a non-reentrant checkpoint when `enabled` and autograd is recording.

    Non-reentrant checkpointing handles non-tensor arguments, inputs without grad, and `autograd.grad`
    calls that ask only for some inputs (the pipeline's split B / W passes), and restores the forward's
    autocast state when it recomputes. The model draws no random numbers, so the RNG state is not stashed:
    stashing it copies the CUDA generator's state to the host at every call, which a CUDA graph cannot
    capture.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)

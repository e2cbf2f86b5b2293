"""Gradient reduction and the global gradient norm under data + expert parallelism.

Every rank weights its micro-batch losses by their share of the *global* batch, so gradients are *summed*
(not averaged) across ranks. Dense parameters are replicated on all dp ranks of a stage: sum over dp.
Routed-expert parameters exist on one rank of each ep group, whose all-to-all backward already gathered the
gradient of every token of the group: sum over expert-dp (the replicas of the same expert slice).
The norm for clipping counts each parameter once: dense ones from any rank, experts summed over ep.

Each function works on `(name, tensor)` pairs whose `.grad` holds the gradient: by default the model's own
parameters, or — under `trainer.dtype=bf16_master` — the fp32 master copies carrying the same names
(optim/master.py), so one reduction and one norm serve both precisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .expert import expert_param_names
from .mesh import Mesh


def _all_reduce_sum(grads: list[torch.Tensor], group, bucket_bytes: int = 64 << 20) -> None:
    """Sum in flat buckets: one collective per bucket instead of one per parameter."""
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for g, new in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            g.copy_(new)
        bucket.clear()

    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()


#: (name, tensor) pairs whose `.grad` holds a parameter's gradient, named like the model's parameters
Named = Sequence[tuple[str, torch.Tensor]]


def named_or_model(model: nn.Module, params: Named | None) -> Named:
    return list(model.named_parameters()) if params is None else params


def split_params(
    model: nn.Module, params: Named | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dense, routed-expert) tensors among `params` (default: the model's parameters) that need gradients."""
    experts = expert_param_names(model)
    dense, expert = [], []
    for n, p in named_or_model(model, params):
        if p.requires_grad:
            (expert if n in experts else dense).append(p)
    return dense, expert


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def reduce_gradients(
    model: nn.Module,
    mesh: Mesh,
    ties: list[tuple[Any, list[str]]] | None = None,
    params: Named | None = None,
) -> None:
    """ties: (process group, parameter names) whose copies on other pipeline ranks must be summed too
    (the embedding read by the first and the last chunk; DualPipe's two copies of every chunk).
    params: the tensors holding the gradients (default: the model's parameters)."""
    if not mesh.distributed:
        return
    dense, expert = split_params(model, params)
    if mesh.layout.dp > 1:
        _all_reduce_sum(_grads(dense), mesh.group("dp"))
    if mesh.layout.edp > 1:
        _all_reduce_sum(_grads(expert), mesh.group("edp"))
    reduce_ties(model, ties, params)


def reduce_ties(
    model: nn.Module,
    ties: list[tuple[Any, list[str]]] | None,
    params: Named | None = None,
    grad_of: Callable[[torch.Tensor], torch.Tensor] = lambda p: _grads([p])[0],
) -> None:
    """Sum the gradients of parameters held by several pipeline ranks (see reduce_gradients). grad_of: where
    a parameter's gradient lives (default `.grad`, zeros where it has none), for an optimizer engine that
    accumulates it elsewhere."""
    by_name = dict(named_or_model(model, params))
    for group, names in ties or []:
        _all_reduce_sum([grad_of(by_name[n]) for n in names], group)


def _by_dtype(params: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    """The gradients present, grouped by dtype: a `_foreach` op takes one dtype and runs as a few
    multi-tensor kernels on CUDA instead of one or more launches per parameter."""
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            out.setdefault(p.grad.dtype, []).append(p.grad)
    return out


def _sum_of_squares(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ‖grad‖² over `params` in fp32: per-tensor norms by `_foreach_norm`, squared and summed."""
    total = torch.zeros((), device=device)
    for grads in _by_dtype(params).values():
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = total + torch.stack(norms).pow(2).sum()
    return total


def global_grad_norm(
    model: nn.Module, mesh: Mesh, owned: set[str] | None = None, params: Named | None = None
) -> torch.Tensor:
    """owned: the parameter names this pipeline rank counts (a copy held by several ranks counts once)."""
    named = named_or_model(model, params)
    names = {n for n, _ in named} if owned is None else owned
    experts = expert_param_names(model)
    dense = [p for n, p in named if n in names and n not in experts]
    expert = [p for n, p in named if n in names and n in experts]
    dev = next(model.parameters()).device
    sq_dense, sq_expert = _sum_of_squares(dense, dev), _sum_of_squares(expert, dev)
    if mesh.distributed and mesh.layout.ep > 1:
        dist.all_reduce(sq_expert, group=mesh.group("ep"))
    total = sq_dense + sq_expert
    if mesh.distributed and mesh.layout.pp > 1:
        dist.all_reduce(total, group=mesh.group("pp"))
    return total.sqrt()


def clip_gradients(
    model: nn.Module,
    mesh: Mesh,
    max_norm: float,
    owned: set[str] | None = None,
    params: Named | None = None,
) -> torch.Tensor:
    """Clip to max_norm (inf: measure only) by the layout-independent global norm; returns the norm, on the
    device (reading it is the caller's choice: it waits for the backward)."""
    norm = global_grad_norm(model, mesh, owned, params)
    if max_norm != float("inf"):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grads in _by_dtype([p for _, p in named_or_model(model, params)]).values():
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm

"""Full (layout-independent) model and optimizer state under expert parallelism.

Saving gathers each rank's expert slices over its ep group, so rank 0 holds exactly the state dict a
one-process run would have (same names, full expert tensors); loading slices the experts this rank owns
back out. A checkpoint written under one (dp, ep) layout therefore loads under any other. This keeps a whole
copy on rank 0 — fine for the model sizes CPU tests and single nodes use; sharded `torch.distributed
.checkpoint` files replace it for large models (docs/checkpoints.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .expert import expert_param_names
from .mesh import Mesh


def _expert_names_and_slice(model: nn.Module) -> tuple[set[str], int, int]:
    from ..model.moe import RoutedExperts

    first = count = 0
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            first, count = m.first_expert, m.num_local
            break
    return expert_param_names(model), first, count


def _gather0(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(mesh.layout.ep)]
    dist.all_gather(parts, t.contiguous(), group=mesh.group("ep"))
    return torch.cat(parts, dim=0)


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, optimizer state dict) of the whole model, identical on every rank."""
    model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim_sd = optimizer.state_dict()
    if mesh.layout.ep == 1:
        return model_sd, optim_sd
    experts, _, _ = _expert_names_and_slice(model)
    for name in sorted(experts):
        model_sd[name] = _gather0(model_sd[name], mesh)
    for group in optim_sd["param_groups"]:
        for idx, name in zip(group["params"], group["names"], strict=True):
            if name in experts and idx in optim_sd["state"]:
                # state_dict() shares the per-parameter dicts with the live optimizer: copy before editing
                st = optim_sd["state"][idx] = dict(optim_sd["state"][idx])
                for key, val in list(st.items()):
                    if torch.is_tensor(val) and val.ndim > 0:
                        st[key] = _gather0(val, mesh)
    return model_sd, optim_sd


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, Any] | None,
) -> None:
    """Load a whole-model state into a model that may hold only a slice of the experts."""
    experts, first, count = _expert_names_and_slice(model)
    own = model.state_dict()
    sliced = {}
    for k, v in model_sd.items():
        if k in experts and k in own and v.shape[0] != own[k].shape[0]:
            v = v[first : first + count]
        sliced[k] = v
    model.load_state_dict(sliced)
    if optimizer is None or optim_sd is None:
        return
    for group in optim_sd["param_groups"]:
        for idx, name in zip(group["params"], group["names"], strict=True):
            if name in experts and idx in optim_sd["state"]:
                st = optim_sd["state"][idx] = dict(optim_sd["state"][idx])
                for key, val in list(st.items()):
                    if torch.is_tensor(val) and val.ndim > 0 and val.shape[0] != own[name].shape[0]:
                        st[key] = val[first : first + count].clone()
    optimizer.load_state_dict(optim_sd)


def full_shapes(model: nn.Module, n_experts: int) -> dict[str, torch.Tensor]:
    """Meta tensors with the whole model's state shapes (expert slices widened to all experts)."""
    experts, _, _ = _expert_names_and_slice(model)
    out = {}
    for k, v in model.state_dict().items():
        shape = (n_experts, *v.shape[1:]) if k in experts else tuple(v.shape)
        out[k] = torch.empty(shape, device="meta")
    return out


def full_gradients(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as the one-process model would hold it (expert slices gathered)."""
    experts, _, _ = _expert_names_and_slice(model)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = _gather0(g, mesh) if name in experts and mesh.layout.ep > 1 else g.detach().clone()
    return out

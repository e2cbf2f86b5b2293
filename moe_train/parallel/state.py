"""Full (layout-independent) model and optimizer state under expert and pipeline parallelism.

`full_state` gathers each rank's expert slices over its ep group and the pipeline ranks' layers over pp, so
every rank holds exactly the state a one-process run would have (same names, full expert tensors; optimizer
state keyed by parameter name) — what tests compare against one process. `load_full_state` takes the layers
and the expert slice a rank holds back out of such a state: the whole-model checkpoint format (HF imports,
runs before sharded checkpoints) loads under any layout through it. Training checkpoints are sharded and never
gather (train/sharded.py).
"""

from __future__ import annotations

from collections.abc import Callable
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


def optim_by_name(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (not by position), so it survives any re-partitioning."""
    sd = optimizer.state_dict()
    by_name: dict[str, dict[str, Any]] = {}
    for group in sd["param_groups"]:
        for idx, name in zip(group["params"], group["names"], strict=True):
            if idx in sd["state"]:
                by_name[name] = dict(sd["state"][idx])
    groups = [{k: v for k, v in g.items() if k not in ("params", "names")} for g in sd["param_groups"]]
    return {"by_name": by_name, "param_groups": groups}


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, name-keyed optimizer state) of the whole model, on every rank.

    Expert slices (and their Adam moments) are gathered over ep; pipeline ranks' parts are merged over pp.
    """
    model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim_sd = optim_by_name(optimizer)
    experts, _, _ = _expert_names_and_slice(model)
    if mesh.layout.ep > 1:
        for name in sorted(experts):
            model_sd[name] = _gather0(model_sd[name], mesh)
        for name in sorted(experts):
            st = optim_sd["by_name"].get(name, {})
            for key, val in list(st.items()):
                if torch.is_tensor(val) and val.ndim > 0:
                    st[key] = _gather0(val, mesh)
    if mesh.distributed and mesh.layout.pp > 1:
        parts: list[Any] = [None] * mesh.layout.pp
        dist.all_gather_object(parts, (model_sd, optim_sd["by_name"]), group=mesh.group("pp"))
        for part_model, part_optim in parts:
            for k, v in part_model.items():
                model_sd.setdefault(k, v)
            for k, v in part_optim.items():
                optim_sd["by_name"].setdefault(k, v)
    return model_sd, optim_sd


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, Any] | None,
    load_named: Callable[[dict[str, Any], Callable[[str, torch.Tensor], torch.Tensor]], None] | None = None,
) -> None:
    """Load a whole-model state into a model that may hold only some layers and a slice of the experts.

    load_named(by_name, fit): loads name-keyed optimizer state into an optimizer that is not a plain torch
    one (DeepSpeed ZeRO); `fit` cuts a whole-model tensor to this rank's expert slice."""
    experts, first, count = _expert_names_and_slice(model)
    own = model.state_dict()

    def fit(name: str, v: torch.Tensor) -> torch.Tensor:
        if name in experts and v.ndim > 0 and v.shape[0] != own[name].shape[0]:
            return v[first : first + count].clone()
        return v

    model.load_state_dict({k: fit(k, v) for k, v in model_sd.items() if k in own})
    if load_named is not None:
        # hyper-parameters come from the config (lr is set every step), only the state is restored
        load_named(optim_sd["by_name"] if optim_sd else {}, fit)
        return
    if optimizer is None or optim_sd is None:
        return
    by_name = {
        name: {k: fit(name, v) if torch.is_tensor(v) else v for k, v in saved.items()}
        for name, saved in optim_sd["by_name"].items()
    }
    load_named_optim(optimizer, by_name, optim_sd["param_groups"])


def load_named_optim(
    optimizer: torch.optim.Optimizer,
    by_name: dict[str, dict[str, Any]],
    param_groups: list[dict[str, Any]] | None = None,
) -> None:
    """Load name-keyed state (this rank's shapes) into a torch optimizer whose groups carry `names`;
    param_groups: saved hyper-parameters, else the optimizer's own (they come from the config)."""
    current = optimizer.state_dict()
    state = {}
    for group in current["param_groups"]:
        for idx, name in zip(group["params"], group["names"], strict=True):
            if name in by_name:
                state[idx] = dict(by_name[name])
    groups = current["param_groups"]
    if param_groups is not None:
        groups = [{**g, **saved} for g, saved in zip(groups, param_groups, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def full_gradients(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as the one-process model would hold it (expert slices gathered over ep,
    pipeline ranks' layers merged over pp). Call after the gradient reduction."""
    experts, _, _ = _expert_names_and_slice(model)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = _gather0(g, mesh) if name in experts and mesh.layout.ep > 1 else g.detach().clone()
    if mesh.distributed and mesh.layout.pp > 1:
        parts: list[Any] = [None] * mesh.layout.pp
        dist.all_gather_object(parts, out, group=mesh.group("pp"))
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)
    return out

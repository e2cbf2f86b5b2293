"""The whole model as one process holds it: the whole-model checkpoint format, and whole-model state across
expert and pipeline parallelism.

Whole-model format (`moe_train/single-v1`): what `python -m moe_train.hf import` writes; resume, export and
generation read it as they read sharded checkpoints. One checkpoint, `checkpoints/step_00000100/`:
  model.pt          model state dict (canonical names; router biases included)
  optim.pt          name-keyed optimizer state (absent in model-only checkpoints, e.g. HF imports)
  trainer.pt        step and anything else the trainer needs to continue
  config.yaml       the resolved config of the run that wrote it
  meta.json         written last, with every file's size and checksum: its presence marks a complete
                    checkpoint
It is written into `step_N.tmp-<pid>` and published as directory.py describes.

Across ep and pp: `full_state` and `full_gradients` gather each rank's expert slices over its ep group and the
pipeline ranks' layers over pp, so every rank holds exactly what a one-process run would (same names, full
expert tensors; optimizer state keyed by parameter name) — what tests compare against one process.
`load_full_state` takes the layers and the expert slice a rank holds back out of such a state: the
whole-model format loads under any layout through it. Training checkpoints are sharded and never gather.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import RoutedExperts
from ..parallel.expert import expert_param_names
from ..parallel.mesh import Mesh
from .directory import (
    CheckpointError,
    checkpoint_name,
    publish,
    read_meta,
    resolve_checkpoint,
    write_common,
    write_meta,
)
from .integrity import CHECKSUM, read_back
from .sharded import is_sharded
from .sharded import load_model_state as load_sharded_model_state

FORMAT = "moe_train/single-v1"


# ------------------------------------------------------------------------------------------------ format
def save_checkpoint(
    ckpt_root: str,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int | None = None,
) -> str:
    """Write a whole-model checkpoint of `step` under `ckpt_root`, point `latest` to it; returns its path."""
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, checkpoint_name(step))
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(model_state, os.path.join(tmp, "model.pt"))
    if optim_state is not None:
        torch.save(optim_state, os.path.join(tmp, "optim.pt"))
    write_common(tmp, trainer_state, config_yaml)
    names = [os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs]
    files, problems = read_back(tmp, dict.fromkeys(names, 0), collective=False)
    if problems:
        raise CheckpointError(f"checkpoint of step {step} not committed, {tmp}: {problems[0]}")
    meta = {"step": step, "format": FORMAT, "has_optim": optim_state is not None}
    write_meta(tmp, meta, files, CHECKSUM)
    publish(tmp, final, keep_last)
    return final


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A whole-model checkpoint's files: {path, meta, model, optim (or None), trainer, config_yaml}."""
    path = resolve_checkpoint(path)
    out: dict[str, Any] = {"path": path, "meta": read_meta(path)}
    out["model"] = torch.load(os.path.join(path, "model.pt"), map_location=map_location, weights_only=True)
    optim_path = os.path.join(path, "optim.pt")
    out["optim"] = (
        torch.load(optim_path, map_location=map_location, weights_only=False)
        if os.path.exists(optim_path)
        else None
    )
    trainer_path = os.path.join(path, "trainer.pt")
    out["trainer"] = torch.load(trainer_path, weights_only=False) if os.path.exists(trainer_path) else {}
    cfg_path = os.path.join(path, "config.yaml")
    out["config_yaml"] = open(cfg_path, encoding="utf-8").read() if os.path.exists(cfg_path) else None
    return out


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """The whole one-process model state dict of a checkpoint of either format, on CPU (memory-mapped for
    whole-model checkpoints); for HF export and inference."""
    path = resolve_checkpoint(path)
    if is_sharded(path):
        return load_sharded_model_state(path)
    return torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True, mmap=True)


# ------------------------------------------------------------------------------------ across ep and pp
def _expert_names_and_slice(model: nn.Module) -> tuple[set[str], int, int]:
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


def full_gradients(
    model: nn.Module, mesh: Mesh, params: Sequence[tuple[str, torch.Tensor]] | None = None
) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as the one-process model would hold it (expert slices gathered over ep,
    pipeline ranks' layers merged over pp). Call after the gradient reduction. params: the (name, tensor)
    pairs whose `.grad` holds the gradients (default: the model's parameters; the fp32 masters under
    `trainer.dtype=bf16_master`, optim/master.py)."""
    experts, _, _ = _expert_names_and_slice(model)
    out = {}
    for name, p in model.named_parameters() if params is None else params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = _gather0(g, mesh) if name in experts and mesh.layout.ep > 1 else g.detach().clone()
    if mesh.distributed and mesh.layout.pp > 1:
        parts: list[Any] = [None] * mesh.layout.pp
        dist.all_gather_object(parts, out, group=mesh.group("pp"))
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)
    return out


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

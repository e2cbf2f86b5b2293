"""What a training checkpoint holds for the trainer, and how it is written and read back.

The trainer's state is its model and optimizer (either engine), the step (which also fixes the learning
rate and the data position: both are functions of it), the wandb run id, the skipped-step count and every
rank's RNG states. `save` writes it as a sharded checkpoint (sharded.py); `load` reads that format under any
layout, and the whole-model format (whole.py: HF imports) too.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..model import build_model
from ..parallel.mesh import Mesh
from .directory import read_meta
from .errors import checkpoint_io
from .mismatch import check_model_state
from .sharded import (
    PendingSave,
    expert_splits,
    has_optim,
    is_sharded,
    load_into,
    model_entries,
    optim_entries,
    read_rng,
    stored_shapes,
)
from .sharded import save as save_sharded
from .whole import load_checkpoint, load_full_state, load_named_optim, optim_by_name


class NamedOptimizerState(Protocol):
    """Optimizer state partitioned across ranks (DeepSpeed ZeRO), read and written by parameter name and
    shaped like this rank's parameters, as the torch engine's state is (checkpoints)."""

    def named_state(self) -> dict[str, dict[str, Any]]: ...

    def load_named_state(
        self, by_name: dict[str, dict[str, Any]], fit: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> None: ...


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def layout_of(mesh: Mesh) -> dict[str, int]:
    lay = mesh.layout
    return {"world": lay.world, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep}


def save(
    root: str,
    trainer_state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    zero: NamedOptimizerState | None,
    mesh: Mesh,
    config_yaml: str,
    keep_last: int | None,
    async_save: bool = False,
    async_group: Any = None,
) -> str | PendingSave:
    """This rank's shards of model and optimizer state, plus its RNG, as the checkpoint of
    `trainer_state["step"]` under `root`; collective over every rank. Returns the checkpoint's path, or with
    async_save a PendingSave for `commit_pending`."""
    tensors = model_entries(model)
    by_name = zero.named_state() if zero is not None else optim_by_name(optimizer)["by_name"]
    tensors.update(optim_entries(model, by_name))
    return save_sharded(
        root,
        trainer_state["step"],
        tensors,
        trainer_state,
        rng_state(),
        config_yaml,
        layout_of(mesh),
        keep_last,
        async_save,
        async_group,
    )


def load(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    zero: NamedOptimizerState | None,
    mesh: Mesh,
    model_cfg: ModelConfig,
) -> dict[str, Any]:
    """Load a checkpoint of either format into this rank's (partial) model and its optimizer; returns the
    trainer state (step, wandb_id, skipped_steps)."""
    if is_sharded(path):
        return _load_sharded(path, model, optimizer, zero, mesh)
    return _load_whole(path, model, optimizer, zero, mesh, model_cfg)


def _load_sharded(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    zero: NamedOptimizerState | None,
    mesh: Mesh,
) -> dict[str, Any]:
    """Each rank reads exactly the keys of its own partial model (and their optimizer state)."""
    tensors = model_entries(model)
    by_name: dict[str, dict[str, Any]] = {}
    stored = stored_shapes(path)
    if has_optim(stored):
        splits = expert_splits(model)
        for name, p in model.named_parameters():
            state = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            state["step"] = torch.zeros(())
            entries = optim_entries(model, {name: state}, splits)
            if all(k in stored for k in entries):  # a parameter that never had a gradient has no state
                by_name[name] = state
                tensors.update(entries)
    load_into(path, tensors, stored)
    if zero is not None:
        zero.load_named_state(by_name, lambda _name, v: v)
    elif by_name:
        load_named_optim(optimizer, by_name)
    with checkpoint_io("reading", os.path.join(path, "trainer.pt")):
        tr = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    saved_layout = (read_meta(path) or {}).get("layout")
    rng = read_rng(path, mesh.rank)
    if rng is not None and saved_layout == layout_of(mesh):
        set_rng_state(rng)  # the same layout continues bit for bit; another layout re-seeds nothing
    return tr


def _load_whole(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    zero: NamedOptimizerState | None,
    mesh: Mesh,
    model_cfg: ModelConfig,
) -> dict[str, Any]:
    """Whole-model checkpoints (`moe_train/single-v1`, e.g. HF imports)."""
    state = load_checkpoint(path, map_location=next(model.parameters()).device)
    expected = build_model(model_cfg, device="meta").state_dict()
    check_model_state(expected, state["model"], path)
    load_full_state(
        model, optimizer, state["model"], state["optim"], zero.load_named_state if zero is not None else None
    )
    tr = dict(state["trainer"])
    tr.setdefault("step", state["meta"]["step"])
    if "rng" in tr and not mesh.distributed:
        set_rng_state(tr["rng"])
    return tr

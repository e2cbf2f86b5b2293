"""The optimizer engine: everything between a micro-batch's loss and the updated weights.

The trainer drives one interface whichever engine runs (`optim.engine`): `begin_step`, `backward` per
micro-batch, then `step(lr)` (reduce over dp / expert-dp and tied copies, clip by the global norm, update)
followed by `zero_grad`, or `drop_step` for a step whose loss was not finite. Engines differ in where
gradients are reduced and how optimizer state is laid out; the memory estimate learns the latter through
`state_sharding`, checkpoints through `optimizer` or, for state partitioned across ranks, `sharded_state`.

- `TorchEngine`: AdamW on full replicas; gradients summed by `parallel.grads` after backward, or while
  backward runs (`parallel.grad_sync`, `parallel.overlap_grad_reduce`).
- `DeepSpeedZero` (optim/deepspeed_zero): DeepSpeed ZeRO-1/2 reduces, clips and updates.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..checkpoint.trainer_state import NamedOptimizerState
from ..config import TrainConfig
from ..model.memory import StateSharding
from ..parallel.grad_sync import OverlappedGradReduce
from ..parallel.grads import clip_gradients, reduce_gradients, reduce_ties
from ..parallel.mesh import Mesh
from . import build_optimizer, set_lr
from .deepspeed_zero import DeepSpeedZero

Ties = list[tuple[Any, list[str]]]


class OptimizerEngine(Protocol):
    #: what checkpoints save and load (its state is full on every rank unless `sharded_state` is set)
    optimizer: torch.optim.Optimizer

    @property
    def sharded_state(self) -> NamedOptimizerState | None:
        """The name-keyed view of partitioned optimizer state; None when `optimizer.state` is complete."""
        ...

    def state_sharding(self) -> StateSharding:
        """How this rank's gradients and optimizer state are laid out, for the memory estimate."""
        ...

    def begin_step(self) -> None:
        """Called before a step's first backward."""
        ...

    def backward(self, tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Accumulate a micro-batch's gradients: backpropagate `tensors` with incoming `grads` (a pipeline
        stage's outputs, or the loss already weighted by the micro-batch's share of the batch)."""
        ...

    def step(self, lr: float) -> float:
        """Reduce over dp / expert-dp and tied copies, clip by the global norm, update; returns the norm."""
        ...

    def zero_grad(self) -> None: ...

    def drop_step(self) -> None:
        """Drop this step's gradients without reducing them (a non-finite loss)."""
        ...


class TorchEngine:
    """AdamW (`build_optimizer`) over full replicas; `parallel.grads` reduces and clips."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        mesh: Mesh,
        ties: Ties,
        owned: set[str] | None,
        overlap_grad_reduce: bool,
    ) -> None:
        self.model, self.mesh, self.ties, self.owned = model, mesh, ties, owned
        self.optimizer = build_optimizer(model, cfg.optim)
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.grad_sync: OverlappedGradReduce | None = None
        if overlap_grad_reduce and mesh.distributed:
            sync = OverlappedGradReduce(model, mesh, cfg.parallel.microbatches)
            self.grad_sync = sync if sync.active else None

    @property
    def sharded_state(self) -> None:
        return None

    def state_sharding(self) -> StateSharding:
        return StateSharding()

    def begin_step(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.arm()  # reductions start inside the last micro-batch's backward

    def backward(self, tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        torch.autograd.backward(tensors, grads)

    def step(self, lr: float) -> float:
        if self.grad_sync is not None:
            self.grad_sync.finish()
            reduce_ties(self.model, self.ties)
        else:
            reduce_gradients(self.model, self.mesh, self.ties)
        grad_norm = clip_gradients(self.model, self.mesh, self.clip, self.owned)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        return grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def drop_step(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.finish()  # overlapped reductions already ran: let them end, then drop
        self.zero_grad()


def build_engine(
    cfg: TrainConfig,
    model: nn.Module,
    mesh: Mesh,
    ties: Ties,
    owned: set[str] | None,
    pipeline: bool,
    run_dir: str | None,
) -> OptimizerEngine:
    """The engine `optim.engine` names. `pipeline`: backward runs through the pipeline executor, whose
    schedule decides when gradients are final, so reductions cannot overlap it."""
    if cfg.optim.engine == "deepspeed":
        return DeepSpeedZero(
            model,
            cfg.deepspeed,
            cfg.optim,
            mesh,
            cfg.data.batch_size,
            cfg.parallel.microbatches,
            owned,
            run_dir,
            ties=ties,
        )
    overlap = cfg.parallel.overlap_grad_reduce and not pipeline
    return TorchEngine(model, cfg, mesh, ties, owned, overlap)

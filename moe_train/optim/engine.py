"""The optimizer engine: everything between a micro-batch's loss and the updated weights.

The trainer drives one interface whichever engine runs (`optim.engine`): `begin_step`, `backward` per
micro-batch, then `step(lr)` (reduce over dp / expert-dp and tied copies, clip by the global norm, update)
followed by `zero_grad`, or `drop_step` for a step whose loss was not finite. Engines differ in where
gradients are reduced and how optimizer state is laid out; the memory estimate learns the latter through
`state_sharding`, checkpoints through `optimizer` or, for state partitioned across ranks, `sharded_state`.

- `TorchEngine`: AdamW on full replicas; gradients summed by `parallel.grads` after backward, or while
  backward runs (`parallel.grad_sync`, `parallel.overlap_grad_reduce`). Under `trainer.dtype=bf16_master`
  the model's parameters are bf16 and the engine holds their fp32 masters (optim/master.py): gradients
  accumulate, reduce and clip there, AdamW updates them, and they are cast back once per step.
- `DeepSpeedZero` (optim/deepspeed_zero): DeepSpeed ZeRO-1/2 reduces, clips and updates.
"""

from __future__ import annotations

import contextlib
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
from .master import MasterWeights, param_dtype, precision

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

    @property
    def skips_on_device(self) -> bool:
        """Whether `step` takes a device flag for skipping (the trainer then reads nothing per step)."""
        ...

    def step(self, lr: float, skip: torch.Tensor | None = None) -> float | torch.Tensor:
        """Reduce over dp / expert-dp and tied copies, clip by the global norm, update; returns the norm.
        skip: where the engine `skips_on_device`, a device flag that turns the update into a no-op without
        the host reading it (the norm then stays on the device too)."""
        ...

    def zero_grad(self) -> None: ...

    def checkpoint_weights(self) -> contextlib.AbstractContextManager:
        """While entered, the model's parameters hold the weights checkpoints save and load (fp32)."""
        ...

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
        masters: MasterWeights | None = None,
    ) -> None:
        """masters: fp32 masters of the model's (bf16) parameters; None: the parameters are the weights."""
        self.model, self.mesh, self.ties, self.owned = model, mesh, ties, owned
        self.masters = masters  # built before the overlapped reduction: its hooks must run first
        self.params = masters.named if masters is not None else None  # where gradients live, by name
        self.optimizer = build_optimizer(model, cfg.optim, None if masters is None else dict(masters.named))
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.grad_sync: OverlappedGradReduce | None = None
        # zero gradients in place instead of freeing them: a captured backward (pipeline/graphed.py)
        # accumulates into the buffers it was recorded with
        self.keep_grads = False
        if overlap_grad_reduce and mesh.distributed:
            holder = masters.master_of if masters is not None else None
            sync = OverlappedGradReduce(model, mesh, cfg.parallel.microbatches, holder=holder)
            self.grad_sync = sync if sync.active else None

    @property
    def sharded_state(self) -> None:
        return None

    def state_sharding(self) -> StateSharding:
        moments = 2 * getattr(self.optimizer, "moments_dtype", torch.float32).itemsize  # torch's: fp32
        return StateSharding(optimizer_bytes=moments, master_weights=self.masters is not None)

    def begin_step(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.arm()  # reductions start inside the last micro-batch's backward

    def backward(self, tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        torch.autograd.backward(tensors, grads)

    @property
    def skips_on_device(self) -> bool:
        """Whether `step` can take its skip decision as a device flag: torch's fused AdamW reads one
        (`found_inf`, the flag AMP's grad scaler hands it) and leaves weights, moments and its step count
        as they were where it is set."""
        opt = self.optimizer
        return type(opt) is torch.optim.AdamW and all(g.get("fused") for g in opt.param_groups)

    def step(self, lr: float, skip: torch.Tensor | None = None) -> float | torch.Tensor:
        """See `OptimizerEngine.step`; skip (`skips_on_device` only): a device flag, true to leave every
        weight and state as it is, and the norm is then returned on the device, unread."""
        if self.grad_sync is not None:
            self.grad_sync.finish()
            reduce_ties(self.model, self.ties, self.params)
        else:
            reduce_gradients(self.model, self.mesh, self.ties, self.params)
        grad_norm = clip_gradients(self.model, self.mesh, self.clip, self.owned, self.params)
        set_lr(self.optimizer, lr)
        if skip is not None:
            if not self.skips_on_device:
                raise ValueError(f"{type(self.optimizer).__name__} cannot take a device skip flag")
            self.optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            if skip is not None:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        if self.masters is not None:
            self.masters.copy_to_model()  # a skipped step leaves the masters, and so the copies, as they were
        return grad_norm if skip is not None else float(grad_norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)

    def drop_step(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.finish()  # overlapped reductions already ran: let them end, then drop
        self.zero_grad()

    def checkpoint_weights(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.masters is None else self.masters.as_parameters()


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
            bf16_master=precision(cfg.trainer.dtype, mesh.device) == "bf16_master",
        )
    overlap = cfg.parallel.overlap_grad_reduce and not pipeline
    dtype = param_dtype(precision(cfg.trainer.dtype, mesh.device))
    masters = MasterWeights(model, dtype) if dtype is not None else None
    return TorchEngine(model, cfg, mesh, ties, owned, overlap, masters)

"""Expert load balancing: the auxiliary-loss-free bias controller, the loss terms, MaxVio metrics.

Modes (`balance.mode`):
- aux_free (DeepSeek-V3): after each optimizer step, each router's selection bias moves by
  γ·sign(mean_load − load_i), with loads counted over the whole global batch; plus the small
  complementary sequence-wise loss α·Σ f_i P_i (`balance.seq_aux_alpha`).
- aux_loss: the classic batch-wise auxiliary loss (per micro-batch), no bias.
- none: no balancing at all (the baseline the other two are compared with).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .config import BalanceConfig
from .model.moe import BalanceLoss, MoE


def maxvio(counts: torch.Tensor) -> torch.Tensor:
    """(max_i load_i − mean load) / mean load over the last dimension (one value per row of a (layers,
    experts) table: a few ops for every layer at once); 0 is perfect balance, and a row with no load."""
    c = counts.double()
    mean = c.mean(-1)
    return torch.where(mean > 0, (c.amax(-1) - mean) / mean.clamp(min=torch.finfo(c.dtype).tiny), 0.0)


def balance_loss_spec(cfg: BalanceConfig) -> BalanceLoss:
    if cfg.mode == "aux_free":
        return BalanceLoss("seq", cfg.seq_aux_alpha)
    if cfg.mode == "aux_loss":
        return BalanceLoss("batch", cfg.aux_loss_alpha)
    return BalanceLoss(None, 0.0)


class BiasController:
    """Moves each MoE layer's selection bias towards balance after every optimizer step.

    `reduce`, when given, sums the per-layer counts over the data-parallel world (all ranks must see the
    same loads so their biases stay identical).
    """

    def __init__(self, cfg: BalanceConfig, max_steps: int) -> None:
        self.cfg = cfg
        self.max_steps = max_steps

    def gamma(self, step: int) -> float:
        """γ for the update that follows optimizer step `step` (0-based); 0 after the stop fraction."""
        if self.cfg.mode != "aux_free":
            return 0.0
        if step >= self.cfg.bias_update_stop_frac * self.max_steps:
            return 0.0
        return self.cfg.bias_update_rate

    @torch.no_grad()
    def update(
        self,
        layers: Iterable[MoE],
        counts: dict[int, torch.Tensor],
        step: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        keep: torch.Tensor | None = None,
    ) -> float:
        """keep: a device flag (1.0 or 0.0) the update is multiplied by, for a step whose skip is decided on
        the device (the trainer's deferred reads); None: applied. reduce: sums a (layers, experts) load
        table over ranks.

        Every layer moves in the same few kernels (one table of loads, one multi-tensor add into the
        biases): after a step replayed from a CUDA graph, a handful of kernels per layer here would be most
        of what the host still launches."""
        gamma = self.gamma(step)
        if gamma == 0.0:
            return gamma
        pairs = [
            (moe.gate.e_score_correction_bias, counts[moe.layer_id])
            for moe in layers
            if moe.layer_id in counts
        ]
        if not pairs:
            return gamma
        biases = [b for b, _ in pairs]
        load = torch.stack([c for _, c in pairs]).to(device=biases[0].device, dtype=torch.float32)
        if reduce is not None:
            load = reduce(load)
        move = gamma * torch.sign(load.mean(dim=1, keepdim=True) - load)
        if keep is not None:
            move = move * keep
        torch._foreach_add_(biases, list(move.to(biases[0].dtype).unbind(0)))
        return gamma

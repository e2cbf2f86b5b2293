"""When the trainer saves: every `trainer.ckpt_every` steps, every `trainer.ckpt_every_minutes` of wall-clock
time, and at the last step (a preemption saves too; the loop decides that itself).

Steps alone bound a long run's loss only if the user picks a step count that matches the step time; a clock
bounds it by default, whatever a step costs. Each rank measures time on its own clock, and ranks that
disagreed on whether to save would leave the others waiting in the collective save: the decision is taken
from the largest elapsed time over every rank (one small all-reduce per step), so it is the same everywhere.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from ..config import TrainerConfig
from .totals import Totals


class SavePolicy:
    def __init__(self, t: TrainerConfig, totals: Totals) -> None:
        self.t, self.totals = t, totals
        self.since = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether step `step` (just taken) saves; collective when time-based saving is on."""
        t = self.t
        by_steps = bool(t.ckpt_every) and step % t.ckpt_every == 0
        by_time = False
        if t.ckpt_every_minutes > 0:
            (elapsed,) = self.totals.values([time.monotonic() - self.since], op=dist.ReduceOp.MAX)
            by_time = elapsed >= 60.0 * t.ckpt_every_minutes
        return by_steps or by_time or step == t.max_steps

    def saved(self) -> None:
        """A checkpoint was just written: the clock counts training time from here."""
        self.since = time.monotonic()

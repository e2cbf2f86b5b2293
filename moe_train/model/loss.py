"""The training objective in one place: L = LM loss + λ·MTP loss + balance loss (DeepSeek-V3 §2.1.2, §2.2).

Every path that trains — the plain executor step, the overlap engine's head sub-step, any pipeline stage —
composes its loss here, so a new term is added once. The balance term lives in the router records of a
forward (`MoEStats`), on whichever stage ran those routers; the LM and MTP terms come with the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .stats import MoEStats
from .transformer import ModelOutput


@dataclass
class LossTerms:
    """A stage's share of one micro-batch's loss (unweighted) and its named parts (lm_loss, mtp_loss,
    balance_loss — those this stage has)."""

    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def training_loss(out: ModelOutput | None, stats: MoEStats | None, mtp_weight: float) -> LossTerms:
    """out: the head's losses where this stage holds the head; stats: router records whose balance terms
    join the loss (None where something else backpropagates them)."""
    terms = LossTerms()
    if out is not None and out.lm_loss is not None:
        terms.total = terms.parts["lm_loss"] = out.lm_loss
        if out.mtp_loss is not None:
            terms.parts["mtp_loss"] = out.mtp_loss
            terms.total = terms.total + mtp_weight * out.mtp_loss
    bal = stats.balance_loss() if stats is not None else None
    if bal is not None:
        terms.parts["balance_loss"] = bal
        terms.total = bal if terms.total is None else terms.total + bal
    return terms

"""Stage partitioning: which decoder layers each pipeline chunk holds, and the stage modules themselves.

Chunk 0 also holds the embedding, the last chunk the final norm, head and MTP blocks (and its own copy of
the embedding, which MTP reads). A stage module is the model class built with a subset of the layers, so
parameter names — and with them initial values, checkpoints and HF conversion — are the whole model's.
"""

from __future__ import annotations

from ...config import ModelConfig
from ...model import Transformer, build_model
from ...model.moe import BalanceLoss


def split_layers(n_layers: int, n_chunks: int, explicit: list[int] | None = None) -> list[list[int]]:
    """Layer ids per chunk: an explicit list of counts, or as even as possible (earlier chunks get the
    remainder last, since chunk 0 already carries the embedding and the last chunk the head and MTP)."""
    if explicit is not None:
        if len(explicit) != n_chunks or sum(explicit) != n_layers or min(explicit) < 0:
            raise ValueError(
                f"parallel.stage_layers={explicit} is not allowed: {n_chunks} non-negative counts summing to "
                f"model.num_hidden_layers={n_layers}"
            )
        counts = list(explicit)
    else:
        if n_chunks > n_layers + 1:
            raise ValueError(
                f"{n_chunks} pipeline chunks for model.num_hidden_layers={n_layers}: "
                "at most layers + 1 chunks"
            )
        base, extra = divmod(n_layers, n_chunks)
        # the middle chunks take the remainder: the first and last already carry embedding and head
        order = sorted(range(n_chunks), key=lambda c: (c in (0, n_chunks - 1), c))
        counts = [base] * n_chunks
        for c in order[:extra]:
            counts[c] += 1
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def build_stage(
    cfg: ModelConfig,
    chunk: int,
    chunks: list[list[int]],
    balance: BalanceLoss | None,
    device,
    seed: int,
    expert_slice: tuple[int, int] | None = None,
) -> Transformer:
    return build_model(
        cfg,
        balance,
        device,
        seed,
        expert_slice=expert_slice,
        layer_ids=chunks[chunk],
        first=chunk == 0,
        last=chunk == len(chunks) - 1,
    )

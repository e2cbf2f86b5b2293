"""Stage partitioning: which decoder layers each pipeline chunk holds, and the stage modules themselves.

Chunk 0 also holds the embedding, the last chunk the final norm, head and MTP blocks (and its own copy of
the embedding, which MTP reads). A stage module is the model class built with a subset of the layers, so
parameter names — and with them initial values, checkpoints and HF conversion — are the whole model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...config import ModelConfig
from ...model import ModelOutput, MoEStats, Transformer, build_model
from ...model.documents import Documents
from ...model.moe import BalanceLoss
from ...model.phases import Program, run


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


class StageView:
    """One stage of a rank holding several: the rank builds one `Transformer` with the union of its stages'
    layers (so parameter names, the optimizer and checkpoints are those of a plain model, and an embedding
    used by both the first and the last chunk on one rank is one parameter), and each stage runs its own
    slice of it. A rank holding one stage runs its `Transformer` itself."""

    def __init__(self, model: Transformer, layer_ids: list[int], first: bool, last: bool) -> None:
        self.model, self.layer_ids, self.is_first, self.is_last = model, layer_ids, first, last

    def program(
        self,
        x: torch.Tensor,
        stats: MoEStats | None = None,
        head: Callable[[torch.Tensor], Any] | None = None,
        phases: bool = False,
        docs: Documents | None = None,
    ) -> Program:
        """`Transformer.program` over this stage's slice (the head only on the last stage)."""
        head = head if self.is_last else None
        return self.model.program(x, stats, head, self.layer_ids, self.is_first, phases, docs)

    def head(
        self,
        h: torch.Tensor,
        labels: torch.Tensor | None,
        stats: MoEStats | None = None,
        docs: Documents | None = None,
    ) -> ModelOutput:
        return self.model.head(h, labels, stats, docs=docs)

    def __call__(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        stats: MoEStats | None = None,
        docs: Documents | None = None,
    ) -> torch.Tensor | ModelOutput:
        """Hidden states, or the losses on the last stage (as `Transformer.forward`)."""
        head = (lambda h: self.head(h, labels, stats, docs)) if self.is_last else None
        return run(self.program(x, stats, head, docs=docs))

    def parameters(self):
        m = self.model
        mods = [m.layers[str(i)] for i in self.layer_ids]
        if self.is_first or (self.is_last and len(m.mtp)):
            mods.append(m.embed_tokens)
        if self.is_last:
            mods += [m.norm, m.lm_head, m.mtp]
        seen: set[int] = set()
        for mod in mods:
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def rank_model_and_stages(
    cfg: ModelConfig,
    schedule,
    pp_rank: int,
    balance: BalanceLoss | None,
    device,
    seed: int,
    expert_slice: tuple[int, int] | None,
    stage_layers: list[int] | None = None,
) -> tuple[Transformer, dict[int, Transformer | StageView], list[list[int]]]:
    """The partial model a pipeline rank holds, and what runs each stage it holds: the model itself when
    it holds one, else a view per stage."""
    chunks = split_layers(cfg.num_hidden_layers, schedule.n_chunks, stage_layers)
    mine = schedule.stages_of(pp_rank)
    held = sorted({schedule.chunks[s] for s in mine})
    last_chunk = len(chunks) - 1
    model = build_model(
        cfg,
        balance,
        device,
        seed,
        expert_slice=expert_slice,
        layer_ids=[i for c in held for i in chunks[c]],
        first=0 in held,
        last=last_chunk in held,
    )
    if model.embed_tokens is None and 0 in held:
        raise AssertionError("chunk 0 without an embedding")
    if len(mine) == 1:
        return model, {mine[0]: model}, chunks
    views: dict[int, Transformer | StageView] = {
        s: StageView(
            model, chunks[schedule.chunks[s]], schedule.chunks[s] == 0, schedule.chunks[s] == last_chunk
        )
        for s in mine
    }
    return model, views, chunks


def holders_of(name: str, schedule, chunks: list[list[int]], has_mtp: bool) -> tuple[int, ...]:
    """The pipeline ranks that hold a copy of parameter `name`."""
    holders = [
        tuple(sorted({schedule.rank_of(s) for s in range(schedule.n_stages) if schedule.chunks[s] == c}))
        for c in range(len(chunks))
    ]
    last = len(chunks) - 1
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        return holders[next(c for c, ids in enumerate(chunks) if layer in ids)]
    if name.startswith("embed_tokens."):
        return tuple(sorted(set(holders[0]) | (set(holders[last]) if has_mtp else set())))
    return holders[last]


def build_ties(model: Transformer, mesh, schedule, chunks: list[list[int]]) -> tuple[list, set[str]]:
    """(groups to sum copied gradients over with the names they cover, names this rank counts in the norm).

    Every rank creates every group, in the same order (process-group creation is collective)."""
    import torch.distributed as dist

    has_mtp = model.cfg.num_nextn_predict_layers > 0
    names = [n for n, _ in model.named_parameters()]
    mine = {n: holders_of(n, schedule, chunks, has_mtp) for n in names}
    all_sets = {holders_of(f"layers.{i}.x", schedule, chunks, has_mtp) for ids in chunks for i in ids}
    all_sets |= {holders_of(n, schedule, chunks, has_mtp) for n in ("embed_tokens.weight", "norm.weight")}
    lay, me = mesh.layout, mesh.pp_rank
    ties = []
    for hs in sorted(s for s in all_sets if len(s) > 1):
        covered = [n for n in names if mine[n] == hs]
        for edp in range(lay.edp):
            for ep in range(lay.ep):
                ranks = [lay.rank_of(p, edp, ep) for p in hs]
                group = dist.new_group(ranks) if mesh.distributed else None
                if mesh.rank in ranks and covered:
                    ties.append((group, covered))
    owned = {n for n in names if min(mine[n]) == me}
    return ties, owned

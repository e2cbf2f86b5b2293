"""A one-stage micro-batch — forward, loss and backward — replayed from a CUDA graph.

A small model's step is bound by the host: it issues one kernel per op, thousands a step, each with little
work. Captured once, a micro-batch's forward and backward replay as one launch. What capture needs, and how
the one-stage step provides it:

- Fixed addresses. The tokens are copied into one static buffer. The loss weights that change between steps
  (the micro-batch's share of the batch, the MTP weight) are device scalars filled before each replay.
  Gradients accumulate into buffers that live across steps: the engine zeroes them in place
  (`TorchEngine.keep_grads`). Parameters, fp32 masters and the selection biases are updated in place.
- No host synchronisation inside. The one-process MoE path reads no count on the host (the grouped GEMM
  takes device offsets). The loss terms and router counts come out of the graph as tensors, copied before
  the next replay overwrites them; the trainer reads them when it needs them (`Trainer.settle`).
- The same work on every call. The graph is captured after `warmup` eager micro-batches, which run lazy
  initialisation, torch.compile's first calls and autotuning. It serves micro-batches of the kind it was
  captured with: their shape and, with documents, the mask's kind and the capacity of cuDNN's ragged entries
  (which it recomputes from the replayed ids). A micro-batch of another kind gets a graph of its own.

`graph_blocker` says which steps qualify; the others run as before. Without CUDA (`capture=False`) the same
protocol runs with nothing captured: each replay re-runs the micro-batch on the static buffers. That is how
the tests hold the graphed path to the eager one on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ...model.documents import Documents, ragged_possible
from ...model.stats import RouterRecord
from .schedules import Kind, Schedule

# The executor (`executor.PipelineExecutor`) and its per-step state (`executor._Run`) are typed `Any` here:
# the executor holds this class, so importing it back would close an import circle.
Executor = Any
Run = Any


def one_stage_order(schedule: Schedule, rank: int) -> bool:
    """Whether `rank` runs every micro-batch as its forward directly followed by its full backward, on one
    stage: the order a graphed micro-batch replays."""
    acts = schedule.ranks[rank]
    if schedule.n_stages != 1 or len(acts) % 2:
        return False
    return all(
        (f.kind, b.kind, f.mb, b.mb) == (Kind.F, Kind.BW, m, m)
        for m, (f, b) in enumerate(zip(acts[::2], acts[1::2], strict=True))
    )


def _variant(docs: Documents | None, ragged: bool) -> tuple:
    """What decides a micro-batch's control flow and shapes besides the tokens' shape: plain causal rows,
    rows of one document, or document masks with or without restarted positions, and where cuDNN's ragged
    kernel may run (`ragged`), the capacity of its entries, which fixes their shapes."""
    if docs is None:
        return ("causal",)
    if docs.single:
        return ("single",)
    return ("masked", docs.positions is not None, docs.capacity if ragged else None)


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors`, in order: one stacked copy per (dtype, shape), the copies views into it."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.shape, t.device), []).append(i)
    out: list[torch.Tensor] = list(tensors)
    for idx in groups.values():
        for i, copy in zip(idx, torch.stack([tensors[i] for i in idx]).unbind(0), strict=True):
            out[i] = copy
    return out


@dataclass
class _Captured:
    """One graph and the static run it reads and writes."""

    run: Run
    graph: torch.cuda.CUDAGraph | None


class GraphedMicroBatch:
    """Runs micro-batch `mb` of a step (`__call__`) through `executor`'s one stage: from a CUDA graph per
    kind of micro-batch (shape, documents), captured after `warmup` eager calls of that kind
    (`capture=True`), or through the same static buffers without a graph (`capture=False`)."""

    def __init__(self, executor: Executor, capture: bool, warmup: int = 2) -> None:
        self.executor, self.capture, self.warmup = executor, capture, max(warmup, 1)
        self.stage = next(iter(executor.stages))
        self.ragged = ragged_possible(next(executor.stages[self.stage].parameters()).device)
        self.calls: dict[tuple, int] = {}
        self.captured: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # shared: never replayed at once
        self.side = torch.cuda.Stream() if capture else None  # capture's warm-up stream (torch's rule)

    def __call__(self, run: Run, mb: int) -> None:
        docs = run.segment(run.micro[mb][:, :-1])
        key = (tuple(run.micro[mb].shape), *_variant(docs, self.ragged))
        if key not in self.captured:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= self.warmup:
                if docs is not None:
                    run.docs[mb] = docs.to(next(self.executor.stages[self.stage].parameters()).device)
                with self._side_stream():
                    self._body(run, mb)
                return
            self.captured[key] = self._record(run, run.micro[mb], docs)
        self._replay(self.captured[key], run, mb, docs)

    # ------------------------------------------------------------------------------------------------
    def _body(self, run: Run, mb: int) -> None:
        """The micro-batch as the executor runs it without a graph: forward, then full backward."""
        self.executor._forward(self.stage, mb, run)
        self.executor._backward(self.stage, mb, run, inputs_only=False)

    @contextlib.contextmanager
    def _side_stream(self):  # noqa: ANN202
        """torch's rule for whole-network capture: warm up on a side stream that joins the current one."""
        if self.side is None:
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def _record(self, like: Run, tokens: torch.Tensor, docs: Documents | None) -> _Captured:
        device = next(self.executor.stages[self.stage].parameters()).device
        static = tokens.to(device, copy=True)
        scalar: Callable[[], torch.Tensor] = lambda: torch.zeros((), dtype=torch.float32, device=device)
        run = type(like)([static], [scalar()], scalar(), segment=lambda ids: None)
        run.on_device[0] = static
        if docs is not None:  # static buffers the replays fill with each micro-batch's documents
            positions = None if docs.positions is None else docs.positions.to(device, copy=True)
            run.docs[0] = replace(docs, ids=docs.ids.to(device, copy=True), positions=positions, _masks={})
        graph = None
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            # thread-local: an asynchronous checkpoint writer may use CUDA from its own thread meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._body(run, 0)
        return _Captured(run, graph)

    def _replay(self, c: _Captured, run: Run, mb: int, docs: Documents | None) -> None:
        t = c.run
        t.micro[0].copy_(run.micro[mb], non_blocking=True)
        t.weights[0].fill_(run.weights[mb])
        t.mtp_weight.fill_(run.mtp_weight)
        if docs is not None:
            static = t.docs[0]
            assert static is not None
            static.ids.copy_(docs.ids, non_blocking=True)
            if docs.positions is not None:
                assert static.positions is not None
                static.positions.copy_(docs.positions, non_blocking=True)
        if c.graph is not None:
            c.graph.replay()
        else:
            t.out.pending, t.out.stats.records, t.out.rows = [], [], {}
            if docs is not None:
                t.docs[0] = replace(t.docs[0], _masks={})  # a graph rebuilds the mask from the ids too
            self._body(t, 0)
        # a graph's outputs are overwritten by its next replay: the step keeps copies, one stacked copy per
        # kind (a copy per output would be most of the kernels the host launches around a replay)
        values = _copies([v for _, _, v in t.out.pending])
        for (key, _, _), value in zip(t.out.pending, values, strict=True):
            run.out.add(key, run.weights[mb], value)
        counts = _copies([r.counts for r in t.out.stats.records])
        run.out.stats.records += [
            RouterRecord(r.layer, c, None) for r, c in zip(t.out.stats.records, counts, strict=True)
        ]
        if 0 in t.out.rows:
            run.out.rows[mb] = t.out.rows[0].detach().clone()

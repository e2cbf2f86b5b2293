"""Evaluation: the validation sequences through the training forward, cut exactly like a training step.

The validation set is whole batches of `data.batch_size` sequences (`trainer.eval_sequences` rounded up), so
it is the same set whatever the layout and the micro-batching, and val losses compare across them. Each
batch is cut as a step's batch is (`rank_rows`): this rank's data-parallel share in `parallel.microbatches`
micro-batches, run through the executor's forward without backward (`forward_only`, nothing stashed, on the
pipeline path too). Every forward therefore sees the training micro-batch's shape, and at most one step's
micro-batches are in flight: evaluation never needs more activation memory than a training step, whose
memory the start-up estimate already checked. A mixture (`data.name=mixture`) evaluates each source's
held-out stream as such a set and records `val_loss/NAME` per source; its `val_loss` weighs them by the
mixture's weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import latest_checkpoint
from ..config import TrainConfig
from ..data.mixture import mixture_sources
from ..data.sampler import rank_rows, val_batches
from ..model import MoEStats
from ..parallel.dispatch import CommCounters
from ..parallel.expert import exact_dispatch
from ..parallel.mesh import Mesh
from ..parallel.pipeline.executor import PipelineExecutor
from .faults import EvaluationError, guarded, injected_eval_fault
from .metrics import peak_memory
from .totals import Totals, maxvio_record, on_host


def eval_batch_count(cfg: TrainConfig) -> int:
    """Batches of `data.batch_size` sequences that hold at least `trainer.eval_sequences`."""
    return math.ceil(cfg.trainer.eval_sequences / cfg.data.batch_size)


class Evaluator:
    def __init__(
        self,
        cfg: TrainConfig,
        mesh: Mesh,
        executor: PipelineExecutor,
        totals: Totals,
        val_stream: np.ndarray | Mapping[str, np.ndarray],
        checkpoints_root: str,
        overflows: CommCounters | None = None,
    ) -> None:
        """val_stream: the corpus's validation tokens, or a mixture's, one stream per source name;
        checkpoints_root: where a failure looks up the committed checkpoint it names; overflows: the
        counters of bounded dispatchers (an evaluation that overflowed their buffers runs again exactly)."""
        self.cfg, self.mesh, self.executor, self.totals = cfg, mesh, executor, totals
        self.overflows = overflows
        d, n = cfg.data, eval_batch_count(cfg)
        streams = val_stream if isinstance(val_stream, Mapping) else {"": val_stream}
        # every source gets the whole eval set, so each source's val loss is as precise as a lone corpus's
        self.sets = {k: val_batches(v, d.seq_len, d.batch_size, n) for k, v in streams.items()}
        sources = mixture_sources(d)
        total = sum(s.weight for s in sources)
        self.weights = {s.name: s.weight / total for s in sources} if sources else {"": 1.0}
        self.checkpoints_root = checkpoints_root

    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        """The eval record of `step`: the mean LM loss per validation sequence and MaxVio of the loads.
        Running out of memory raises EvaluationError naming the step, what ran out and the checkpoint to
        continue from; a failed collective is reported as one (`guarded`)."""
        with guarded(self.mesh, f"evaluation at step {step}"):
            try:
                injected_eval_fault(step)
                record = self._run(model, step)
                if self.overflows is not None and self.totals.overflowed(self.overflows):
                    with exact_dispatch(model):
                        record = self._run(model, step)
                return record
            except (torch.OutOfMemoryError, MemoryError) as e:
                raise EvaluationError(step, self._explain(step, e)) from e

    @torch.no_grad()
    def _run(self, model: nn.Module, step: int) -> dict[str, Any]:
        model.eval()
        device = self.mesh.device
        peak_memory(device)  # the record's peak is this evaluation's alone
        stats, losses, n_all = MoEStats(), [], 0
        for batches in self.sets.values():
            loss, n = 0.0, sum(b.shape[0] for b in batches)
            for batch in batches:
                lo, hi, rows = rank_rows(
                    batch.shape[0], self.mesh.dp_rank, self.mesh.layout.dp, self.cfg.parallel.microbatches
                )
                micro = list(batch[lo:hi].split(rows))
                res = self.executor.forward_only(micro, [rows / n] * len(micro))  # under its forward context
                loss += res.sums["lm_loss"]
                stats.records.extend(res.stats.records)
            losses.append(loss)
            n_all += n
        per = dict(zip(self.sets, self.totals.values(losses), strict=True))  # one reduction for all sets
        loads = self.totals.loads(stats.counts_by_layer())
        # a mixture's val_loss is the expected loss of a sequence drawn with the training weights
        val_loss = sum(self.weights[k] * v for k, v in per.items())
        record = {"kind": "eval", "step": step, "val_loss": val_loss, "val_sequences": n_all}
        record |= {f"val_loss/{k}": v for k, v in per.items() if k}
        return record | maxvio_record(on_host(loads), "maxvio_global") | peak_memory(device)

    def _explain(self, step: int, e: BaseException) -> str:
        what = "host memory" if isinstance(e, MemoryError) else f"memory on {self.mesh.device}"
        d, p = self.cfg.data, self.cfg.parallel
        rows = d.batch_size // (self.mesh.layout.dp * p.microbatches)
        ckpt = latest_checkpoint(self.checkpoints_root)
        return (
            f"evaluation at step {step} ran out of {what} ({type(e).__name__}: {e}). It runs the training "
            f"micro-batches ({rows} sequences of {d.seq_len} tokens per forward): raise "
            f"parallel.microbatches to shrink them. The latest committed checkpoint is {ckpt}; "
            "trainer.resume=auto continues from it and evaluates again"
        )

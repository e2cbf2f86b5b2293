"""The training loop: build, then for each step run the executor, update, save, log and evaluate.

Losses of one optimizer step are means over the *global* batch: each micro-batch's loss is weighted by its
share of the batch's sequences, so how the batch is cut into micro-batches (or ranks) never changes the
update. Every step runs through the pipeline executor (one stage when pp = 1); the optimizer engine reduces,
clips and updates; hooks after the update (the selection-bias controller) see the step's global loads.
A step's checkpoint is written before its logging and evaluation, and committed (asynchronous saves too)
before an evaluation or the summary runs, so neither can cost the step; a resume at an evaluation step
evaluates it first (it may have failed, or a preemption skipped it). On one process with fused AdamW a step
reads nothing back (`defers_reads`): its records are read and judged before the next log, save or
evaluation (`settle`), so the host can issue steps ahead of the GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from ..balance import BiasController, balance_loss_spec
from ..checkpoint import Checkpointer
from ..config import TrainConfig
from ..model import MoEStats, count_params
from ..model.memory import MemoryEstimate
from ..optim import lr_at
from ..optim.engine import build_engine
from ..parallel.dispatch import BOUNDED, CommCounters
from ..parallel.expert import exact_dispatch
from ..parallel.mesh import Mesh, build_mesh
from ..parallel.pipeline.executor import LOSS_KEYS
from .evaluation import Evaluator
from .faults import (
    EvaluationError,
    Preempted,
    StopRequest,
    check_finite_weights,
    guarded,
    injected_exit,
    nonfinite_verdict,
)
from .metrics import MetricsHub, Throughput, build_loggers, print_summary, profiler, run_summary
from .save_policy import SavePolicy
from .setup import (
    StepFlops,
    autocast_dtype,
    build_data,
    build_stages,
    estimate_stage_memory,
    graphed_steps,
    moe_layer_ids,
    peak_tflops,
    report_memory,
    seed_everything,
    write_run_info,
)
from .totals import Totals, maxvio_record, on_host

# after an optimizer step: (step, global loads per MoE layer, the device flag a deferred skip multiplies
# updates by, or None) -> entries for the step's record
AfterStep = Callable[[int, dict[int, torch.Tensor], torch.Tensor | None], dict[str, Any]]


@dataclass
class _Unread:
    """A step whose record still holds device tensors (`Trainer.settle`)."""

    step: int
    record: dict[str, Any]
    loads: dict[int, torch.Tensor]
    hooked: list[str]  # the record entries the after-step hooks gave: absent from a skipped step's record


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str, mesh: Mesh | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        t, p = cfg.trainer, cfg.parallel
        self.mesh = mesh or build_mesh(p.pp, p.ep, p.gpus_per_node, t.device, p.backend)
        if self.mesh.is_logging_rank:
            os.makedirs(run_dir, exist_ok=True)
        self.checkpoints = Checkpointer(cfg, run_dir, self.mesh)  # first: a run that may not write stops here
        self.device = self.mesh.device
        self.amp = autocast_dtype(cfg, self.device)
        seed_everything(t.seed)
        self.data = build_data(cfg)
        self.counters = CommCounters()
        s = stages = build_stages(cfg, self.mesh, self.counters, self.data)
        self.model, self.executor, self.ties = stages.model, stages.executor, stages.ties
        self.engine = build_engine(cfg, s.model, self.mesh, s.ties, s.owned, s.pipelined, run_dir)
        self.executor.backward_fn, self.executor.forward_context = self.engine.backward, self._autocast

        def with_graphs() -> MemoryEstimate:
            return estimate_stage_memory(cfg, self.mesh, stages, self.amp, self.engine, graphs=True)

        self.cuda_graph = graphed_steps(cfg, self.mesh, self.executor, self.engine, with_graphs)
        # Read a step's numbers back only when they are needed (logging, saving, evaluating, stopping) where
        # the skip of a non-finite step can be taken on the device: one process (no totals to all-reduce),
        # an engine that `skips_on_device`, and no per-source losses (a mixture reads its rows).
        self.defers_reads = (
            not self.mesh.distributed and self.engine.skips_on_device and cfg.data.name != "mixture"
        )
        self._unread: list[_Unread] = []
        self.totals = Totals(self.mesh, moe_layer_ids(cfg), cfg.model.n_routed_experts)
        self.has_balance = balance_loss_spec(cfg.balance).alpha > 0
        self.bias = BiasController(cfg.balance, t.max_steps)
        self.after_step: list[AfterStep] = [
            lambda step, loads, keep: {
                "bias_update_rate": self.bias.update(self.model.moe_layers(), loads, step, keep=keep)
            }
        ] + s.after_step
        self.params = count_params(cfg.model)
        self.flops = StepFlops(cfg, self.data)
        self.peak = peak_tflops(t.peak_tflops, self.device)
        self.memory: MemoryEstimate = estimate_stage_memory(cfg, self.mesh, stages, self.amp, self.engine)
        report_memory(self.memory, self.mesh)
        self.step, self.skipped_steps, self.skip_streak, self.wandb_id = 0, 0, 0, None
        c = self.checkpoints
        # bounded dispatch: a step whose buffers overflowed runs again on the exact path (dispatch/bounded.py)
        self.bounded = p.dispatcher in BOUNDED and self.mesh.layout.ep > 1
        self.redone_steps = 0
        overflows = self.counters if self.bounded else None
        self.evaluator = Evaluator(cfg, self.mesh, s.executor, self.totals, self.data.val, c.root, overflows)
        self._resume()
        if self.mesh.is_logging_rank:
            facts = {"data": self.data.dataset.info, "params": self.params, "flops": self.flops.per_token}
            facts |= {"cuda_graph": self.cuda_graph}
            write_run_info(run_dir, cfg, self.mesh, amp=self.amp, memory=self.memory, **facts)

    # ----------------------------------------------------------------------------------------- state
    def _resume(self) -> None:
        path = self.checkpoints.to_resume()
        if path is None:
            return
        with guarded(self.mesh, f"loading checkpoint {path}"), self.engine.checkpoint_weights():
            tr = self.checkpoints.load(path, self.model, self.engine.optimizer, self.engine.sharded_state)
        self.step, self.wandb_id = int(tr["step"]), tr.get("wandb_id")
        self.skipped_steps = int(tr.get("skipped_steps", 0))
        self.redone_steps = int(tr.get("dispatch_redone_steps", 0))
        if self.mesh.is_logging_rank:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self, commit: bool = False) -> str | None:
        """This step's checkpoint (checkpoint.Checkpointer.save); `commit`: an asynchronous one too, before
        returning (its path; None while one is in flight)."""
        state = {"step": self.step, "wandb_id": self.wandb_id, "skipped_steps": self.skipped_steps}
        state["dispatch_redone_steps"] = self.redone_steps
        yaml, e = OmegaConf.to_yaml(OmegaConf.structured(self.cfg)), self.engine
        check_finite_weights(self.model, self.mesh, self.step)
        with guarded(self.mesh, f"checkpoint of step {self.step}"), e.checkpoint_weights():
            path = self.checkpoints.save(
                state | {"has_optim": True}, self.model, e.optimizer, e.sharded_state, yaml
            )
            return (self.checkpoints.finish() or path) if commit else path

    # ----------------------------------------------------------------------------------------- steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        # no cast cache under CUDA graphs: torch's rule for capture (a cached cast must not outlive it)
        cache = not self.cuda_graph
        return torch.autocast(device_type=self.device.type, dtype=self.amp, cache_enabled=cache)

    def mtp_weight(self, step: int) -> float:
        t = self.cfg.trainer
        return t.mtp_weight if step < t.mtp_weight_switch_frac * t.max_steps else t.mtp_weight_final

    def forward_backward(self, step: int) -> tuple[dict[str, float | None], MoEStats]:
        """Gradients of step `step` on this rank (not yet reduced across ranks) and the global loss totals
        (None for a term the model does not have)."""
        cfg, mesh = self.cfg, self.mesh
        self.model.train()
        micro = self.data.sampler.shard(step, mesh.dp_rank, mesh.layout.dp, cfg.parallel.microbatches)
        weights = [mb.shape[0] / cfg.data.batch_size for mb in micro]
        res = self.executor.run(micro, weights, self.mtp_weight(step), read=not self.defers_reads)
        if self.bounded and self.totals.overflowed(self.counters):
            self.redone_steps += 1
            if self.mesh.is_logging_rank:
                print(
                    f"warning: step {step + 1} overflowed the bounded dispatch buffers and ran again on the "
                    f"exact path ({self.redone_steps} so far; raise parallel.dispatch_bound or set it to "
                    "null for the worst case)",
                    file=sys.stderr,
                    flush=True,
                )
            self.engine.drop_step()
            self.engine.begin_step()
            with exact_dispatch(self.model):
                res = self.executor.run(micro, weights, self.mtp_weight(step), read=not self.defers_reads)
        sums: dict[str, float | None] = dict(
            zip(LOSS_KEYS, self.totals.values([res.sums[k] for k in LOSS_KEYS]), strict=True)
        ) | self.data.source_losses(step, mesh, res.rows, self.totals)
        # which terms exist is a property of the config; this rank may hold no MoE layer or no head
        if cfg.model.num_nextn_predict_layers == 0:
            sums["mtp_loss"] = None
        if not self.has_balance:
            sums["balance_loss"] = None
        return sums, res.stats

    def train_step(self, step: int) -> dict[str, Any]:
        """Step `step`'s update and its metrics record. With `defers_reads` the record leaves this method
        holding device tensors, and the step's verdict (skip, non-finite stop) waits too: `settle` reads them
        back and judges the step, as this method does at once otherwise."""
        cfg, mesh = self.cfg, self.mesh
        self.engine.begin_step()
        with guarded(mesh, f"forward/backward of step {step + 1}"):
            sums, stats = self.forward_backward(step)
        lr = lr_at(step, cfg.optim, cfg.trainer.max_steps)
        record = {"kind": "train", "step": step + 1, **sums, "lr": lr, "bias_update_rate": 0.0}
        record["mtp_weight"] = self.mtp_weight(step) if sums["mtp_loss"] is not None else None
        if self.bounded:
            record["dispatch_redone_steps"] = self.redone_steps
        if self.defers_reads:
            return self._update_unread(step, lr, record, stats)
        skip = not math.isfinite(sums["loss"])  # the same verdict on every rank: totals were all-reduced
        self.skip_streak = nonfinite_verdict(sums, step + 1, self.skip_streak, cfg.trainer)
        with guarded(mesh, f"gradient reduction / optimizer update of step {step + 1}"):
            loads = self.totals.loads(stats.counts_by_layer())
            if skip:
                # A lone bad batch costs one step, not the run: the gradients are dropped before any rank
                # reduces them, so no NaN reaches weights, moments or biases.
                self.engine.drop_step()
                self._count_skip(record)
            else:
                record["grad_norm"] = self.engine.step(lr)  # reduced, clipped by the global norm, applied
                self.engine.zero_grad()
                for hook in self.after_step:
                    record.update(hook(step, loads, None))
        self._load_entries(record, on_host(loads))
        with guarded(mesh, f"communication counters of step {step + 1}"):
            record.update(self.totals.comm_bytes(self.counters))
        return record

    def _update_unread(self, step: int, lr: float, record: dict[str, Any], stats: MoEStats) -> dict[str, Any]:
        """The update of a step whose loss has not been read: the skip is a device flag the optimizer and
        the bias update take (`OptimizerEngine.skips_on_device`), so the host never waits for the GPU here
        and can issue the next step while this one runs."""
        with guarded(self.mesh, f"optimizer update of step {step + 1}"):
            loads = self.totals.loads(stats.counts_by_layer())
            finite = torch.isfinite(record["loss"])
            record["grad_norm"] = self.engine.step(lr, skip=~finite)
            self.engine.zero_grad()
            keep, hooked = finite.to(torch.float32), []
            for hook in self.after_step:
                entries = hook(step, loads, keep)
                record.update(entries)
                hooked += entries
        self._unread.append(_Unread(step, record, loads, hooked))
        return record

    def settle(self) -> None:
        """Read back the steps `train_step` left unread — their scalars in one transfer, their loads in
        another — and judge each in order as a step that reads at once is judged: skip counts, warnings, the
        non-finite stop (NonFiniteLossError), the load entries of its record."""
        unread, self._unread = self._unread, []
        if not unread:
            return
        keys = [[k for k, v in u.record.items() if torch.is_tensor(v)] for u in unread]
        tensors = [
            u.record[k].detach().double().reshape(1) for u, ks in zip(unread, keys, strict=True) for k in ks
        ]
        values = iter(torch.cat(tensors).tolist() if tensors else [])
        loads = on_host({(i, k): v for i, u in enumerate(unread) for k, v in u.loads.items()})
        for i, (u, ks) in enumerate(zip(unread, keys, strict=True)):
            u.record.update({k: next(values) for k in ks})
            self.skip_streak = nonfinite_verdict(u.record, u.step + 1, self.skip_streak, self.cfg.trainer)
            if not math.isfinite(u.record["loss"]):  # the device skipped it: the record says so
                for k in u.hooked:
                    u.record.pop(k)
                u.record["bias_update_rate"] = 0.0
                self._count_skip(u.record)
            self._load_entries(u.record, {k: loads[(i, k)] for k in u.loads})

    def _count_skip(self, record: dict[str, Any]) -> None:
        self.skipped_steps += 1
        record["grad_norm"] = float("nan")
        if self.mesh.is_logging_rank:
            msg = f"non-finite loss {record['loss']} at step {record['step']}: step skipped"
            print(f"warning: {msg} ({self.skipped_steps} so far)", file=sys.stderr, flush=True)

    def _load_entries(self, record: dict[str, Any], host: dict[int, torch.Tensor]) -> None:
        record.update(maxvio_record(host, "maxvio_batch"), skipped_steps=self.skipped_steps)
        if self.cfg.trainer.log_expert_load:
            keys = sorted(host)
            loads = torch.stack([host[k] for k in keys]).tolist() if keys else []
            record["expert_load"] = {str(k): v for k, v in zip(keys, loads, strict=True)}

    def evaluate(self) -> dict[str, Any]:
        """This step's eval record: the validation set through the training forward (train/evaluation.py)."""
        return self.evaluator(self.model, self.step)

    def _evaluate_logged(self, hub: MetricsHub) -> dict[str, Any]:
        try:
            record = self.evaluate()
        except EvaluationError as e:
            hub.log({"kind": "eval_failed", "step": e.step, "error": str(e)})
            raise
        hub.log(record)
        return record

    # ----------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        t = self.cfg.trainer
        hub, progress, self.wandb_id = build_loggers(
            self.cfg, self.mesh, self.run_dir, self.step, self.wandb_id
        )
        meter = Throughput(self.flops.tokens, self.flops, self.peak, self.mesh.world)
        last: dict[str, Any] = {}
        last_eval: dict[str, Any] = {}
        stop, saves = StopRequest(), SavePolicy(t, self.totals)
        evaluates = lambda step: step % t.eval_every == 0 or step == t.max_steps
        try:
            if self.step and evaluates(self.step):
                last_eval = self._evaluate_logged(hub)
            with profiler(t.profile, self.device, self.run_dir) as prof:
                while self.step < t.max_steps:
                    record = self.train_step(self.step)
                    self.step += 1
                    injected_exit(self.step, self.mesh.rank)
                    meter.add(self.step - 1)
                    if prof is not None:
                        prof.step()
                    progress.advance()
                    stopping = stop.agreed(self.mesh) and self.step < t.max_steps
                    saving = saves.due(self.step) or stopping
                    logging = self.step % t.log_every == 0 or self.step in (1, t.max_steps)
                    if saving or logging or evaluates(self.step):
                        self.settle()  # the steps' verdicts before anything of them is written
                    if saving:
                        # committed now when anything that may fail follows at this step; a preempted job
                        # is requeued and must find it committed
                        with meter.paused(self.device):
                            self.save(commit=stopping or evaluates(self.step))
                        saves.saved()
                    if logging:
                        last = record | meter.take(self.device)
                        hub.log(last)
                    if stopping:
                        hub.log({"kind": "preempted", "step": self.step, "signal": stop.signame})
                        raise Preempted(self.step, stop.signame or "?")
                    if evaluates(self.step):
                        with meter.paused(self.device):
                            last_eval = self._evaluate_logged(hub)
            self.settle()
            with guarded(self.mesh, "committing the last asynchronous checkpoint"):
                self.checkpoints.finish()
            summary = run_summary(self.step, self.run_dir, self.skipped_steps, last, last_eval)
            ent = self.data.dataset.info.get("unigram_entropy_nats")
            summary |= {"unigram_entropy_nats": ent} if ent else {}
            summary |= {"params_total": self.params.total, "params_active": self.params.active}
            hub.log({"kind": "summary", "step": self.step, **summary})
        finally:
            stop.close()
            hub.close()
            self.checkpoints.close()
        if self.cfg.logger.console and self.mesh.is_logging_rank:
            print_summary(summary)
        return summary

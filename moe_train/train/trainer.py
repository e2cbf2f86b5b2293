"""The single-process training loop: micro-batched steps, eval, balance updates, metrics, checkpoints.

Losses of one optimizer step are means over the *global* batch: each micro-batch's loss is weighted by its
share of the batch's sequences, so how the batch is cut into micro-batches never changes the update.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from .. import checkpoint as ckpt
from ..balance import BiasController, balance_loss_spec, maxvio
from ..config import TrainConfig, resolved_dict
from ..data import GlobalBatchSampler, build_dataset
from ..data.sampler import val_batches
from ..model import MoEStats, build_model, count_params, is_moe_layer, train_flops_per_token
from ..model.memory import MemoryEstimate, ZeroSharding, estimate_memory
from ..model.recompute import set_recompute
from ..optim import build_optimizer, lr_at, set_lr
from ..optim.deepspeed_zero import DeepSpeedZero
from ..parallel.dispatch import CommCounters
from ..parallel.expert import apply_expert_parallel, expert_param_names, expert_slice
from ..parallel.grad_sync import OverlappedGradReduce
from ..parallel.grads import clip_gradients, reduce_gradients, reduce_ties
from ..parallel.mesh import Mesh, build_mesh
from ..parallel.overlap import OverlapEngine
from ..parallel.pipeline.analysis import peak_activations
from ..parallel.pipeline.executor import PipelineExecutor
from ..parallel.pipeline.schedules import build_schedule
from ..parallel.pipeline.stages import build_ties, rank_model_and_stages
from .faults import Preempted, StopRequest, guarded, injected_exit
from .metrics import (
    ConsoleLogger,
    JsonlLogger,
    MetricsHub,
    ProgressLogger,
    WandbLogger,
    print_summary,
    stderr_is_tty,
)


class NonFiniteLossError(RuntimeError):
    pass


LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")
COMM_KEYS = tuple(
    f"{d}{s}" for d in ("dispatch", "combine") for s in ("", "_remote", "_intra_node", "_inter_node")
)


KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """bf16 autocast on CUDA by default, none (fp32) on CPU."""
    if dtype == "fp32":
        return None
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def peak_tflops(cfg_value: float | None, device: torch.device) -> float | None:
    if cfg_value:
        return cfg_value
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str, mesh: Mesh | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        t, p = cfg.trainer, cfg.parallel
        self.mesh = mesh or build_mesh(p.pp, p.ep, p.gpus_per_node, t.device, p.backend)
        if self.mesh.is_logging_rank:
            os.makedirs(run_dir, exist_ok=True)
        self.device = self.mesh.device
        self.amp = autocast_dtype(self.device, t.dtype)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)

        self.data = build_dataset(cfg.data)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.data.vocab_size
        elif cfg.model.vocab_size < self.data.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({self.data.vocab_size}); set model.vocab_size >= {self.data.vocab_size} or null"
            )
        self.sampler = GlobalBatchSampler(self.data.train, cfg.data.seq_len, cfg.data.batch_size, t.seed)
        self.val = val_batches(self.data.val, cfg.data.seq_len, cfg.data.batch_size, t.eval_batches)

        balance = balance_loss_spec(cfg.balance)
        experts = expert_slice(cfg.model.n_routed_experts, self.mesh)
        # parallel.overlap runs through the executor too (pp=1: its 1F1B pairs micro-batch i's forward with
        # micro-batch i-1's backward)
        self.pipeline = p.pp > 1 or p.schedule != "1f1b" or p.overlap
        self.ties: list = []
        self.owned: set[str] | None = None
        # (layer ids incl. MTP blocks, holds the head) per stage this rank runs, and micro-batches in flight
        mem_stages: list[tuple[list[int], bool]]
        in_flight = 1
        if self.pipeline:
            schedule = build_schedule(p.schedule, p.pp, p.microbatches, p.overlap)
            self.model, stages, chunks = rank_model_and_stages(
                cfg.model, schedule, self.mesh.pp_rank, balance, self.device, t.seed, experts, p.stage_layers
            )
            set_recompute(self.model, t.recompute)
            mtp_ids = [cfg.model.num_hidden_layers + d for d in range(len(self.model.mtp))]
            mem_stages = [(list(v.layer_ids) + (mtp_ids if v.last else []), v.last) for v in stages.values()]
            # The executor keeps a stage's graph until its W pass, so activations count until W.
            in_flight = peak_activations(schedule, release="W")[self.mesh.pp_rank]
            self.ties, self.owned = build_ties(self.model, self.mesh, schedule, chunks)
            lay = self.mesh.layout
            peers = [lay.rank_of(q, self.mesh.edp_rank, self.mesh.ep_rank) for q in range(lay.pp)]
            self.executor = PipelineExecutor(
                schedule,
                self.mesh.pp_rank,
                stages,
                peers,
                None,
                cfg.model.hidden_size,
                # the residual stream between stages keeps the weights' dtype, also under autocast
                next(self.model.parameters()).dtype,
                overlap=OverlapEngine(sm_carveout=p.overlap_sm_carveout) if p.overlap else False,
            )
        else:
            self.model = build_model(cfg.model, balance, self.device, t.seed, expert_slice=experts)
            set_recompute(self.model, t.recompute)
            mtp_ids = [cfg.model.num_hidden_layers + d for d in range(len(self.model.mtp))]
            mem_stages = [([int(k) for k in self.model.layers] + mtp_ids, True)]
        self.moe_layer_ids = [
            i
            for i in range(cfg.model.num_hidden_layers + cfg.model.num_nextn_predict_layers)
            if is_moe_layer(cfg.model, i)
        ]
        self.counters = CommCounters()
        apply_expert_parallel(self.model, self.mesh, self.counters, dispatcher=p.dispatcher)
        if cfg.model.init_from:
            from ..hf import load_hf_weights

            load_hf_weights(self.model, cfg.model.init_from)
        self.zero: DeepSpeedZero | None = None
        if cfg.optim.engine == "deepspeed":
            self.zero = DeepSpeedZero(
                self.model,
                cfg.deepspeed,
                cfg.optim,
                self.mesh,
                cfg.data.batch_size,
                p.microbatches,
                self.owned,
                run_dir,
            )
            self.optimizer = self.zero.optimizer
        else:
            self.optimizer = build_optimizer(self.model, cfg.optim)
        self.grad_sync: OverlappedGradReduce | None = None
        if p.overlap_grad_reduce and self.zero is None and not self.pipeline and self.mesh.distributed:
            sync = OverlappedGradReduce(self.model, self.mesh, p.microbatches)
            self.grad_sync = sync if sync.active else None
        self.bias = BiasController(cfg.balance, t.max_steps)
        self.params = count_params(cfg.model)
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_tflops(t.peak_tflops, self.device)
        rows = cfg.data.batch_size // (self.mesh.layout.dp * p.microbatches)
        self.memory: MemoryEstimate = estimate_memory(
            self.model,
            cfg.model,
            mem_stages,
            rows * cfg.data.seq_len,
            in_flight,
            t.recompute,
            self.amp == torch.bfloat16,
            self._zero_sharding(),
        )
        print(self.memory.line(self.mesh.rank), flush=True)
        self.step = 0
        self.skipped_steps = 0
        self.wandb_id: str | None = None
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self._pending_save: ckpt.PendingSave | None = None
        # background checkpoint writes coordinate on their own gloo group, never racing the training
        # collectives on the main one (which is NCCL on GPUs)
        self._async_group = None
        if t.async_save and self.mesh.distributed:
            self._async_group = dist.new_group(backend="gloo")
        self._resume()
        self._write_run_info()

    def _zero_sharding(self) -> ZeroSharding | None:
        if self.zero is None:
            return None
        ds, lay = self.cfg.deepspeed, self.mesh.layout
        experts = expert_param_names(self.model) if lay.ep > 1 else set()
        n_expert = sum(p.numel() for n, p in self.model.named_parameters() if n in experts)
        return ZeroSharding(ds.zero_stage, lay.dp, lay.edp, ds.offload_optimizer == "cpu", n_expert)

    # ----------------------------------------------------------------------------------------- state
    def _resume(self) -> None:
        mode = self.cfg.trainer.resume
        if mode == "none":
            return
        path = ckpt.latest_checkpoint(self.ckpt_root) if mode == "auto" else ckpt.resolve_checkpoint(mode)
        if path is None:
            return
        with guarded(self.mesh, f"loading checkpoint {path}"):
            tr = ckpt.load(path, self.model, self.optimizer, self.zero, self.mesh, self.cfg.model)
        self.step = int(tr["step"])
        self.wandb_id = tr.get("wandb_id")
        self.skipped_steps = int(tr.get("skipped_steps", 0))
        if self.mesh.is_logging_rank:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> str | None:
        """Every rank writes its own shards (checkpoint/sharded.py), committed atomically once all are done.
        With `trainer.async_save` the write runs in the background and is committed at the next save or at
        the end of the run."""
        t = self.cfg.trainer
        trainer_state = {
            "step": self.step,
            "wandb_id": self.wandb_id,
            "skipped_steps": self.skipped_steps,
            "has_optim": True,
        }
        with guarded(self.mesh, f"checkpoint of step {self.step}"):
            self.finish_pending_save()
            out = ckpt.save(
                self.ckpt_root,
                trainer_state,
                self.model,
                self.optimizer,
                self.zero,
                self.mesh,
                OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
                t.keep_last,
                t.async_save,
                self._async_group,
            )
        if isinstance(out, ckpt.PendingSave):
            self._pending_save = out
            return None
        return out

    def finish_pending_save(self) -> str | None:
        """Commit an asynchronous save still in flight (collective); None if there is none."""
        pending, self._pending_save = self._pending_save, None
        if pending is None:
            return None
        return ckpt.commit_pending(pending, self.cfg.trainer.keep_last)

    def _write_run_info(self) -> None:
        if not self.mesh.is_logging_rank:
            return
        info = {
            "data": self.data.info,
            "params_total": self.params.total,
            "params_active": self.params.active,
            "params_mtp": self.params.mtp_total,
            "train_flops_per_token": self.flops_per_token,
            "device": str(self.device),
            "world_size": self.mesh.world,
            "layout": {"pp": self.mesh.layout.pp, "dp": self.mesh.layout.dp, "ep": self.mesh.layout.ep},
            "autocast": str(self.amp) if self.amp else "fp32",
            "recompute": self.cfg.trainer.recompute,
            "memory_estimate_rank0": self.memory.as_dict(),
        }
        with open(os.path.join(self.run_dir, "run_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=str)

    # ----------------------------------------------------------------------------------------- steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def mtp_weight(self, step: int) -> float:
        t = self.cfg.trainer
        return t.mtp_weight if step < t.mtp_weight_switch_frac * t.max_steps else t.mtp_weight_final

    def forward_backward(self, step: int) -> tuple[dict[str, float | None], MoEStats]:
        """Gradients of step `step` on this rank (not yet reduced across ranks) and the loss totals."""
        cfg = self.cfg
        self.model.train()
        mesh = self.mesh
        micro = self.sampler.shard(step, mesh.dp_rank, mesh.layout.dp, cfg.parallel.microbatches)
        lam = self.mtp_weight(step)
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        has_mtp = has_bal = False
        step_stats = MoEStats()
        if self.pipeline:
            weights = [mb.shape[0] / cfg.data.batch_size for mb in micro]
            with self._autocast():
                res = self.executor.run(micro, weights, lam)
            sums, step_stats = res.sums, res.stats
            # which terms exist is a property of the config; this rank may hold no MoE layer or no head
            has_mtp = cfg.model.num_nextn_predict_layers > 0
            spec = balance_loss_spec(cfg.balance)
            has_bal = spec.kind is not None and spec.alpha > 0
            micro = []
        for mb in micro:
            mb = mb.to(self.device, non_blocking=True)
            inputs, labels = mb[:, :-1], mb[:, 1:]
            weight = mb.shape[0] / cfg.data.batch_size
            stats = MoEStats()
            with self._autocast():
                out = self.model(inputs, labels, stats)
            loss = out.lm_loss
            sums["lm_loss"] += weight * out.lm_loss.item()
            if out.mtp_loss is not None:
                loss = loss + lam * out.mtp_loss
                sums["mtp_loss"] += weight * out.mtp_loss.item()
                has_mtp = True
            bal = stats.balance_loss()
            if bal is not None:
                loss = loss + bal
                sums["balance_loss"] += weight * bal.item()
                has_bal = True
            sums["loss"] += weight * loss.item()
            if self.zero is not None:
                self.zero.backward(loss * weight)
            else:
                (loss * weight).backward()
            step_stats.records.extend(stats.records)
        totals = self._sum_over_dp([sums[k] for k in LOSS_KEYS])
        out_sums: dict[str, float | None] = dict(zip(LOSS_KEYS, totals, strict=True))
        if not has_mtp:
            out_sums["mtp_loss"] = None
        if not has_bal:
            out_sums["balance_loss"] = None
        return out_sums, step_stats

    def train_step(self, step: int) -> dict[str, Any]:
        cfg, mesh = self.cfg, self.mesh
        if self.grad_sync is not None:
            self.grad_sync.arm()  # reductions start inside the last micro-batch's backward
        with guarded(mesh, f"forward/backward of step {step + 1}"):
            sums, step_stats = self.forward_backward(step)
        lr = lr_at(step, cfg.optim, cfg.trainer.max_steps)
        # the same verdict on every rank: totals were all-reduced
        skip = not math.isfinite(sums["loss"])
        if skip and not cfg.trainer.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss {sums['loss']} at step {step} (lm_loss {sums['lm_loss']}); "
                "weights were not updated. Lower optim.lr, check the data, resume from a checkpoint, "
                "or set trainer.skip_nonfinite=true to skip such steps."
            )
        with guarded(mesh, f"gradient reduction / optimizer update of step {step + 1}"):
            if skip:
                # A lone bad batch (or a transient overflow) costs one step, not the run; the gradients
                # are dropped before any rank reduces them, so no NaN reaches weights, moments or biases.
                if self.grad_sync is not None:
                    self.grad_sync.finish()  # (overlapped reductions already ran: let them end, then drop)
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                grad_norm, gamma = float("nan"), 0.0
                if mesh.is_logging_rank:
                    print(
                        f"warning: non-finite loss {sums['loss']} at step {step + 1}: step skipped "
                        f"({self.skipped_steps} so far)",
                        file=sys.stderr,
                        flush=True,
                    )
                counts = self._counts_over_dp(step_stats.counts_by_layer())
            else:
                if self.zero is not None:
                    # DeepSpeed reduces over dp / expert-dp, clips by the global norm and updates
                    reduce_ties(self.model, self.ties)
                    grad_norm = self.zero.step(lr)
                else:
                    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                    if self.grad_sync is not None:
                        self.grad_sync.finish()
                        reduce_ties(self.model, self.ties)
                    else:
                        reduce_gradients(self.model, mesh, self.ties)
                    grad_norm = clip_gradients(self.model, mesh, clip, self.owned)
                    set_lr(self.optimizer, lr)
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                counts = self._counts_over_dp(step_stats.counts_by_layer())
                gamma = self.bias.update(self.model.moe_layers(), counts, step)
        per_layer = {str(k): maxvio(v) for k, v in sorted(counts.items())}
        record: dict[str, Any] = {
            "kind": "train",
            "step": step + 1,
            "loss": sums["loss"],
            "lm_loss": sums["lm_loss"],
            "mtp_loss": sums["mtp_loss"],
            "balance_loss": sums["balance_loss"],
            "mtp_weight": self.mtp_weight(step) if sums["mtp_loss"] is not None else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "bias_update_rate": gamma,
            "maxvio_batch": float(np.mean(list(per_layer.values()))) if per_layer else 0.0,
            "maxvio_batch_per_layer": per_layer,
            "skipped_steps": self.skipped_steps,
        }
        if cfg.trainer.log_expert_load:
            record["expert_load"] = {str(k): v.tolist() for k, v in sorted(counts.items())}
        with guarded(mesh, f"communication counters of step {step + 1}"):
            record.update(self._comm_bytes())
        return record

    # ------------------------------------------------------------------------------- cross-rank sums
    def _data_group(self):
        """Ranks whose contributions add up to the global batch: dp, or every rank when pipelined (each
        pipeline rank holds other layers and the last stage alone sees the LM loss)."""
        return self.mesh.group("world") if self.pipeline else self.mesh.group("dp")

    def _sum_over_dp(self, values: list[float]) -> list[float]:
        if not self.mesh.distributed or (self.mesh.layout.dp == 1 and not self.pipeline):
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self._data_group())
        return t.tolist()

    def _counts_over_dp(self, counts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Loads of the whole global batch for every MoE layer: every rank then moves its biases alike."""
        if not self.mesh.distributed or (self.mesh.layout.dp == 1 and not self.pipeline):
            return counts
        layers = self.moe_layer_ids
        t = torch.zeros(len(layers), self.cfg.model.n_routed_experts, dtype=torch.long, device=self.device)
        for i, k in enumerate(layers):
            if k in counts:
                t[i] = counts[k].to(self.device)
        dist.all_reduce(t, group=self._data_group())
        return {k: t[i].cpu() for i, k in enumerate(layers)}

    def _comm_bytes(self) -> dict[str, float]:
        """Expert all-to-all bytes of this step, summed over ranks (nothing with ep = 1)."""
        if self.mesh.layout.ep == 1:
            return {}
        got = self.counters.take()
        totals = self._sum_over_dp([float(got.get(k, 0)) for k in COMM_KEYS])
        return {f"a2a_{k}_bytes": v for k, v in zip(COMM_KEYS, totals, strict=True)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        stats = MoEStats()
        dp, r = self.mesh.layout.dp, self.mesh.dp_rank
        loss_sum = 0.0
        for batch in self.val:
            rows = batch.shape[0] // dp
            shard = batch[r * rows : (r + 1) * rows]
            if self.pipeline:
                with self._autocast():
                    res = self.executor.forward_only([shard], [rows / batch.shape[0]])
                loss_sum += res.sums["lm_loss"]
                stats.records.extend(res.stats.records)
                continue
            shard = shard.to(self.device)
            with self._autocast():
                out = self.model(shard[:, :-1], shard[:, 1:], stats)
            loss_sum += out.lm_loss.item() * rows / batch.shape[0]
        (loss_sum,) = self._sum_over_dp([loss_sum])
        counts = self._counts_over_dp(stats.counts_by_layer())
        per_layer = {str(k): maxvio(v) for k, v in sorted(counts.items())}
        return {
            "kind": "eval",
            "step": self.step,
            "val_loss": loss_sum / len(self.val),
            "maxvio_global": float(np.mean(list(per_layer.values()))) if per_layer else 0.0,
            "maxvio_global_per_layer": per_layer,
        }

    # ----------------------------------------------------------------------------------------- run
    def _loggers(self) -> MetricsHub:
        t, lg = self.cfg.trainer, self.cfg.logger
        tty = stderr_is_tty()
        if not self.mesh.is_logging_rank:
            self.progress = ProgressLogger(t.max_steps, self.step, enabled=False)
            return MetricsHub([])
        loggers: list[Any] = [JsonlLogger(os.path.join(self.run_dir, "metrics.jsonl"))]
        self.progress = ProgressLogger(t.max_steps, self.step, enabled=t.progress and tty)
        loggers.append(self.progress)
        if lg.console and not (t.progress and tty):
            loggers.append(ConsoleLogger())
        if lg.wandb.enabled:
            w = WandbLogger(self.run_dir, lg.wandb, resolved_dict(self.cfg), self.wandb_id)
            self.wandb_id = w.run_id
            loggers.append(w)
        return MetricsHub(loggers)

    def _profiler(self) -> contextlib.AbstractContextManager:
        if not self.cfg.trainer.profile:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        return profile(
            activities=acts,
            schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
            on_trace_ready=tensorboard_trace_handler(os.path.join(self.run_dir, "profile")),
        )

    def run(self) -> dict[str, Any]:
        t = self.cfg.trainer
        hub = self._loggers()
        tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len
        last_eval: dict[str, Any] | None = None
        last: dict[str, Any] | None = None
        window_t, window_steps = time.perf_counter(), 0
        stop = StopRequest()
        try:
            with self._profiler() as prof:
                while self.step < t.max_steps:
                    record = self.train_step(self.step)
                    self.step += 1
                    injected_exit(self.step, self.mesh.rank)
                    window_steps += 1
                    if prof is not None:
                        prof.step()
                    self.progress.advance()
                    if self.step % t.log_every == 0 or self.step == t.max_steps or self.step == 1:
                        if self.device.type == "cuda":
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - window_t
                        record["tokens_per_s"] = tokens_per_step * window_steps / max(elapsed, 1e-9)
                        if self.peak:
                            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak * 1e12)
                        hub.log(record)
                        last = record
                        window_t, window_steps = time.perf_counter(), 0
                    if self.step % t.eval_every == 0 or self.step == t.max_steps:
                        with guarded(self.mesh, f"evaluation at step {self.step}"):
                            last_eval = self.evaluate()
                        hub.log(last_eval)
                    saved = (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.max_steps
                    if saved:
                        self.save()
                    if stop.agreed(self.mesh) and self.step < t.max_steps:
                        if not saved:
                            self.save()
                        self.finish_pending_save()  # the requeued job must find it committed
                        hub.log({"kind": "preempted", "step": self.step, "signal": stop.signame})
                        raise Preempted(self.step, stop.signame or "?")
            with guarded(self.mesh, "committing the last asynchronous checkpoint"):
                self.finish_pending_save()
            summary = self._summary(last, last_eval)
            hub.log({"kind": "summary", "step": self.step, **summary})
        finally:
            stop.close()
            hub.close()
        if self.cfg.logger.console and self.mesh.is_logging_rank:
            print_summary(summary)
        return summary

    def _summary(self, last: dict[str, Any] | None, last_eval: dict[str, Any] | None) -> dict[str, Any]:
        s: dict[str, Any] = {"steps": self.step, "run_dir": self.run_dir, "skipped_steps": self.skipped_steps}
        if last:
            s.update(loss=last["loss"], tokens_per_s=last["tokens_per_s"], maxvio_batch=last["maxvio_batch"])
            if "mfu" in last:
                s["mfu"] = last["mfu"]
        if last_eval:
            s.update(val_loss=last_eval["val_loss"], maxvio_global=last_eval["maxvio_global"])
        ent = self.data.info.get("unigram_entropy_nats")
        if ent:
            s["unigram_entropy_nats"] = ent
        s["params_total"] = self.params.total
        s["params_active"] = self.params.active
        return s

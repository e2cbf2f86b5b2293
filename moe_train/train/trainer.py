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
import time
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from ..balance import BiasController, balance_loss_spec, maxvio
from ..config import TrainConfig, resolved_dict
from ..data import GlobalBatchSampler, build_dataset
from ..data.sampler import val_batches
from ..model import MoEStats, build_model, count_params, train_flops_per_token
from ..optim import build_optimizer, lr_at, set_lr
from . import checkpoint as ckpt
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


KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        t = cfg.trainer
        self.device = pick_device(t.device)
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

        self.model = build_model(cfg.model, balance_loss_spec(cfg.balance), self.device, t.seed)
        if cfg.model.init_from:
            from ..hf import load_hf_weights

            load_hf_weights(self.model, cfg.model.init_from)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.bias = BiasController(cfg.balance, t.max_steps)
        self.params = count_params(cfg.model)
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_tflops(t.peak_tflops, self.device)
        self.step = 0
        self.wandb_id: str | None = None
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self._resume()
        self._write_run_info()

    # ----------------------------------------------------------------------------------------- state
    def _resume(self) -> None:
        mode = self.cfg.trainer.resume
        if mode == "none":
            return
        path = ckpt.latest_checkpoint(self.ckpt_root) if mode == "auto" else ckpt.resolve_checkpoint(mode)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, map_location=self.device)
        ckpt.check_model_state(self.model.state_dict(), state["model"], path)
        self.model.load_state_dict(state["model"])
        if state["optim"] is not None:
            self.optimizer.load_state_dict(state["optim"])
        tr = state["trainer"]
        self.step = int(tr.get("step", state["meta"]["step"]))
        self.wandb_id = tr.get("wandb_id")
        if "rng" in tr:
            set_rng_state(tr["rng"])
        print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> str:
        trainer_state = {
            "step": self.step,
            "rng": rng_state(),
            "wandb_id": self.wandb_id,
            "data_step": self.step,
        }
        return ckpt.save_checkpoint(
            self.ckpt_root,
            self.step,
            self.model.state_dict(),
            self.optimizer.state_dict(),
            trainer_state,
            OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
            keep_last=self.cfg.trainer.keep_last,
        )

    def _write_run_info(self) -> None:
        info = {
            "data": self.data.info,
            "params_total": self.params.total,
            "params_active": self.params.active,
            "params_mtp": self.params.mtp_total,
            "train_flops_per_token": self.flops_per_token,
            "device": str(self.device),
            "autocast": str(self.amp) if self.amp else "fp32",
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

    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        micro = self.sampler.shard(step, rank=0, world=1, microbatches=cfg.parallel.microbatches)
        lam = self.mtp_weight(step)
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        has_mtp = has_bal = False
        step_stats = MoEStats()
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
            (loss * weight).backward()
            step_stats.records.extend(stats.records)
        if not math.isfinite(sums["loss"]):
            raise NonFiniteLossError(
                f"non-finite loss {sums['loss']} at step {step} (lm_loss {sums['lm_loss']}); "
                "weights were not updated. Lower optim.lr, check the data, or resume from a checkpoint."
            )
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        lr = lr_at(step, cfg.optim, cfg.trainer.max_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = step_stats.counts_by_layer()
        gamma = self.bias.update(self.model.moe_layers(), counts, step)
        per_layer = {str(k): maxvio(v) for k, v in sorted(counts.items())}
        record: dict[str, Any] = {
            "kind": "train",
            "step": step + 1,
            "loss": sums["loss"],
            "lm_loss": sums["lm_loss"],
            "mtp_loss": sums["mtp_loss"] if has_mtp else None,
            "balance_loss": sums["balance_loss"] if has_bal else None,
            "mtp_weight": lam if has_mtp else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "bias_update_rate": gamma,
            "maxvio_batch": float(np.mean(list(per_layer.values()))) if per_layer else 0.0,
            "maxvio_batch_per_layer": per_layer,
        }
        if cfg.trainer.log_expert_load:
            record["expert_load"] = {str(k): v.tolist() for k, v in sorted(counts.items())}
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        losses, stats = [], MoEStats()
        for batch in self.val:
            batch = batch.to(self.device)
            with self._autocast():
                out = self.model(batch[:, :-1], batch[:, 1:], stats)
            losses.append(out.lm_loss.item())
        counts = stats.counts_by_layer()
        per_layer = {str(k): maxvio(v) for k, v in sorted(counts.items())}
        return {
            "kind": "eval",
            "step": self.step,
            "val_loss": float(np.mean(losses)),
            "maxvio_global": float(np.mean(list(per_layer.values()))) if per_layer else 0.0,
            "maxvio_global_per_layer": per_layer,
        }

    # ----------------------------------------------------------------------------------------- run
    def _loggers(self) -> MetricsHub:
        t, lg = self.cfg.trainer, self.cfg.logger
        loggers: list[Any] = [JsonlLogger(os.path.join(self.run_dir, "metrics.jsonl"))]
        tty = stderr_is_tty()
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
        try:
            with self._profiler() as prof:
                while self.step < t.max_steps:
                    record = self.train_step(self.step)
                    self.step += 1
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
                        last_eval = self.evaluate()
                        hub.log(last_eval)
                    if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.max_steps:
                        self.save()
            summary = self._summary(last, last_eval)
            hub.log({"kind": "summary", "step": self.step, **summary})
        finally:
            hub.close()
        if self.cfg.logger.console:
            print_summary(summary)
        return summary

    def _summary(self, last: dict[str, Any] | None, last_eval: dict[str, Any] | None) -> dict[str, Any]:
        s: dict[str, Any] = {"steps": self.step, "run_dir": self.run_dir}
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

"""Where metrics go: metrics.jsonl (always, rank 0), a live progress bar, a console summary, wandb.

Loggers share one tiny interface (`log(record)`, `close()`), and the hub fans a record out to each.  wandb
is imported only when enabled, so `import moe_train` stays fast and GPU images without wandb work.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..data.mixture import mixture_sources, step_source_tokens


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible instead of invalid JSON
    return v


class JsonlLogger:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ProgressLogger:
    """tqdm bar with loss, tokens/s and MaxVio; off when stderr is not a terminal unless forced."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if record.get("kind") == "train":
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                maxvio=f"{record['maxvio_batch']:.2f}",
                refresh=False,
            )
        elif record.get("kind") == "eval":
            self.bar.write(
                f"step {record['step']}: val_loss {record['val_loss']:.4f}  "
                f"maxvio_global {record['maxvio_global']:.3f}"
            )

    def close(self) -> None:
        self.bar.close()


class ConsoleLogger:
    """Plain lines when there is no terminal for a progress bar (batch jobs, CI)."""

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "train":
            print(
                f"step {record['step']:>6}  loss {record['loss']:.4f}  lm {record['lm_loss']:.4f}  "
                f"lr {record['lr']:.2e}  gnorm {record['grad_norm']:.3f}  "
                f"tok/s {record['tokens_per_s']:.0f}  "
                f"maxvio {record['maxvio_batch']:.3f}",
                flush=True,
            )
        elif kind == "eval":
            print(
                f"step {record['step']:>6}  val_loss {record['val_loss']:.4f}  "
                f"maxvio_global {record['maxvio_global']:.3f}",
                flush=True,
            )

    def close(self) -> None:
        pass


class WandbLogger:
    def __init__(self, run_dir: str, cfg: Any, config_dict: dict[str, Any], run_id: str | None) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            tags=list(cfg.tags),
            mode=cfg.mode,
            dir=run_dir,
            config=config_dict,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id

    def log(self, record: dict[str, Any]) -> None:
        flat = {}
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                flat[f"{record.get('kind', 'train')}/{k}"] = v
        self.run.log(flat, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MetricsHub:
    def __init__(self, loggers: list[Any], data: Any = None) -> None:
        """data: the run's `data` config; a mixture's train records get the tokens of each source."""
        self.loggers = loggers
        self.sources = mixture_sources(data) if data is not None else []
        self.data = data

    def log(self, record: dict[str, Any]) -> None:
        if self.sources and record.get("kind") == "train":
            # the batch's composition is a function of the config and the step, so no rank is asked
            d = self.data
            record = record | step_source_tokens(self.sources, d.batch_size, d.seq_len, record["step"] - 1)
        for lg in self.loggers:
            lg.log(record)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def print_summary(summary: dict[str, Any]) -> None:
    width = max(len(k) for k in summary) if summary else 0
    print("\n" + "=" * 48)
    print("run summary")
    print("-" * 48)
    for k, v in summary.items():
        sv = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {sv}")
    print("=" * 48, flush=True)


def build_loggers(
    cfg: Any, mesh: Any, run_dir: str, step: int, wandb_id: str | None
) -> tuple[MetricsHub, ProgressLogger, str | None]:
    """The loggers a run's config asks for (rank 0 only; other ranks log nothing), the progress bar
    (disabled off a terminal), and the wandb run id (kept across resumes)."""
    t, lg = cfg.trainer, cfg.logger
    tty = stderr_is_tty()
    if not mesh.is_logging_rank:
        return MetricsHub([]), ProgressLogger(t.max_steps, step, enabled=False), wandb_id
    progress = ProgressLogger(t.max_steps, step, enabled=t.progress and tty)
    loggers: list[Any] = [JsonlLogger(os.path.join(run_dir, "metrics.jsonl")), progress]
    if lg.console and not (t.progress and tty):
        loggers.append(ConsoleLogger())
    if lg.wandb.enabled:
        from ..config import resolved_dict

        w = WandbLogger(run_dir, lg.wandb, resolved_dict(cfg), wandb_id)
        wandb_id = w.run_id
        loggers.append(w)
    return MetricsHub(loggers, cfg.data), progress, wandb_id


def profiler(enabled: bool, device: Any, run_dir: str) -> contextlib.AbstractContextManager:
    """`trainer.profile`: a torch.profiler trace of steps 3-5 (after a wait and a warm-up step) under
    RUN_DIR/profile, for TensorBoard or Perfetto."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(
        activities=acts,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=tensorboard_trace_handler(os.path.join(run_dir, "profile")),
    )


class Throughput:
    """Tokens per second (and MFU, if the device's peak TFLOP/s is known) and the peak device memory over the
    steps since the last take. flops(step): the training FLOPs of step's global batch (`StepFlops`); MFU
    divides them by the window's time and by the peak of all `devices` that ran the batch."""

    def __init__(
        self, tokens_per_step: int, flops: Callable[[int], float], peak: float | None, devices: int = 1
    ) -> None:
        self.tokens_per_step, self.flops_of, self.peak, self.devices = tokens_per_step, flops, peak, devices
        self.steps, self.flops, self.since = 0, 0.0, time.perf_counter()

    def add(self, step: int) -> None:
        """Step `step` ran in this window."""
        self.steps += 1
        if self.peak:
            self.flops += self.flops_of(step)

    @contextlib.contextmanager
    def paused(self, device: Any) -> Iterator[None]:
        """Time spent inside (a checkpoint, an evaluation) is not training: it leaves the window, so the
        window's tokens/s is the steps' own."""
        if device.type == "cuda":
            torch.cuda.synchronize()  # the steps' kernels still running belong to the window
        start = time.perf_counter()
        try:
            yield
        finally:
            self.since += time.perf_counter() - start

    def take(self, device: Any) -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()  # the window ends when its kernels do
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        out = {"tokens_per_s": self.tokens_per_step * self.steps / elapsed}
        if self.peak:
            out["mfu"] = self.flops / elapsed / (self.peak * 1e12 * self.devices)
        self.steps, self.flops, self.since = 0, 0.0, now
        return out | peak_memory(device)


def peak_memory(device: Any) -> dict[str, float]:
    """`peak_mem_gib`: the most device memory allocated since the previous call, which starts a new window
    (CUDA only; nothing elsewhere). Train records cover the steps since the last one, eval records their
    evaluation alone, so the two peaks compare directly."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_mem_gib": peak}


def run_summary(
    steps: int, run_dir: str, skipped: int, last: dict[str, Any], last_eval: dict[str, Any]
) -> dict[str, Any]:
    """The end-of-run summary: the last logged step's and evaluation's headline numbers."""
    s: dict[str, Any] = {"steps": steps, "run_dir": run_dir, "skipped_steps": skipped}
    s |= {k: last[k] for k in ("loss", "tokens_per_s", "maxvio_batch", "mfu") if k in last}
    return s | {k: last_eval[k] for k in ("val_loss", "maxvio_global") if k in last_eval}

"""Timing helpers shared by the benches (run from the repository root; see bench/README.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], iters: int, device: str, warmup: int = 3) -> float:
    """Mean seconds per call after a barrier (all ranks start together); the slowest rank's time."""
    for _ in range(warmup):
        fn()
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    t = torch.tensor([(time.perf_counter() - t0) / iters], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def median_ms(fn: Callable[[], object], iters: int, group: int, device: str = "cuda") -> float:
    """Median ms per call of fn() over `iters` groups of `group` back-to-back calls, after 3 warm-up calls;
    on CUDA timed by events around each group, so the host queues a group ahead of the GPU as it does in a
    training step and launch cost that a step hides is not counted."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(group):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / group)
        else:
            t0 = time.perf_counter()
            for _ in range(group):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / group)
    return sorted(times)[len(times) // 2]


def emit(lines: list[str], out: str | None) -> None:
    """Print a result table and, when asked, write it where the device tool brings files back."""
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def load_cfg(overrides: list[str]) -> Any:
    """The project config from Hydra overrides, validated for this world (WORLD_SIZE) as train.py does."""
    import os

    from moe_train.config import load_config, to_object, validate
    from moe_train.parallel.layout import check_layout

    cfg = to_object(load_config(overrides))
    validate(cfg)
    check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def shared_run_dir(name: str) -> str:
    """A run directory all ranks of this launch agree on (torchrun's run id names it), for anything every
    rank writes into, such as checkpoint shards."""
    import os
    import tempfile

    launch = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
    return os.path.join(tempfile.gettempdir(), f"{name}_{launch}")


def trainer_steps(overrides: list[str], steps: int, run_dir: str) -> tuple[Any, list[float], list[dict]]:
    """Build the real Trainer from config overrides (validated for this world) and time `steps` train steps.

    Returns (trainer, seconds per step, step records); each step is bracketed by CUDA syncs on a GPU so the
    time is the step's, not its launch's.
    """
    from moe_train.train.trainer import Trainer

    t = Trainer(load_cfg(overrides), run_dir)
    dev = t.device.type
    times, records = [], []
    for s in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        records.append(t.train_step(s))
        sync(dev)
        times.append(time.perf_counter() - t0)
    return t, times, records


def print_row(header: str | None, row: str, out: str | None) -> None:
    """One table row (under its header, if given) on stdout; appended alone to `out`, where runs collect."""
    if header:
        print(header, flush=True)
    print(row, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(row + "\n")


def dispatch_combine(disp: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, n_experts: int) -> Any:
    """A dispatcher's phases run eagerly back to back: dispatch x's rows, double the expert rows and weigh
    them by their gates (a stand-in for the experts), combine; returns (combined rows, the plan)."""
    from moe_train.model.phases import run

    def program():
        plan = yield from disp.plan(idx, n_experts)
        rows, _, gates = yield from disp.dispatch_wait(plan, (yield from disp.dispatch_start(plan, x, w)))
        y = yield from disp.combine_wait(
            plan, (yield from disp.combine_start(plan, rows * 2 * gates[:, None]))
        )
        return y, plan

    return run(program())

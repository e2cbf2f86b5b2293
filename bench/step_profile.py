"""Where a trainer step's time goes, host against device (the single-GPU speed issue: host ms ≤ GPU-busy ms).

Builds the trainer from the same overrides `train.py` takes, runs warm-up steps, then profiles `--steps` steps
(`Trainer.train_step`, what `Trainer.run` calls per step) with torch.profiler and prints per step:
  wall ms      the steps' wall time over their count, profiler on (and, first, off)
  GPU-busy ms  the union of the device's kernel, copy and memset intervals
  host ms      wall minus the time the host thread spent blocked in CUDA synchronising calls (stream, device
               and event synchronize, and the blocking device-to-host copies of `.item()` and `.tolist()`,
               taken as a `cudaMemcpyAsync` over 50 µs): the time it spent issuing work. Host ms above
               GPU-busy ms means the GPU waits on the host (launch-bound).
  syncs        how many of those blocking calls a step makes
  host ms to issue (CUDA)  the host's time to issue a step while a sleep kernel queued ahead keeps the GPU
               busy: no launch then waits for the device or for launch-queue space (a graph launch behind a
               busy GPU blocks on that, which the host ms above counts), so this is the host's own work
  syncs by site (CUDA)  where each host synchronisation of a few steps comes from: CUDA's sync debug mode
               warns at every synchronising call, and the warning's Python stack names the moe_train frames
and the top ops by self CPU time and, on CUDA, by self device time. --sites N adds, from another profiled
window with Python stacks on, the N call sites that issue the most ops per step (what the host launches
outside a captured graph). The profiler adds a few µs per op, so
host ms under it is an upper bound; the wall time without it is printed beside.

Usage (repository root, GPU machine): python bench/step_profile.py model=small [more overrides] [--steps 5]
CPU smoke test: python bench/step_profile.py --steps 2 --warmup 1 model.num_hidden_layers=2 data=synthetic
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_train.config import load_config, to_object  # noqa: E402
from moe_train.train.trainer import Trainer  # noqa: E402

# runtime calls the host waits in (a device-to-host copy into pageable memory blocks until the copy is done)
BLOCKING = ("Synchronize", "cudaMemcpy")
ISSUED = 3  # steps issued behind a sleep kernel (few enough for CUDA's launch queue)


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (µs in, ms out) of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e3


def op_sites(events: list) -> collections.Counter:
    """Ops Python issued (aten ops whose parent is not an aten op) by (op, innermost moe_train frame). The
    frame comes from the op's recorded stack, else from its parents (the profiler's Python tracer makes each
    Python call an event named `path(line): function`), else from the innermost such event of the same
    thread whose time span holds the op's start (where the tracer's events are not linked as parents)."""
    calls = sorted(
        (e for e in events if "moe_train/" in e.name and not e.name.startswith("aten::")),
        key=lambda e: e.time_range.start,
    )
    starts = [e.time_range.start for e in calls]

    def enclosing(e) -> str | None:  # noqa: ANN001
        i = bisect.bisect_right(starts, e.time_range.start)
        while i > 0:  # nested spans: the latest-starting one that holds the op is the innermost
            i -= 1
            c = calls[i]
            if c.thread == e.thread and c.time_range.end >= e.time_range.start:
                return c.name
        return None

    sites: collections.Counter = collections.Counter()
    for e in events:
        parent = e.cpu_parent
        if not e.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        frames = [f for f in (e.stack or []) if "moe_train/" in f]  # where the profiler records stacks
        while not frames and parent is not None:
            frames = [parent.name] if "moe_train/" in parent.name else []
            parent = parent.cpu_parent
        where = frames[0] if frames else enclosing(e)
        sites[(e.name, where.split("moe_train/")[-1] if where else "?")] += 1
    return sites


def issue_ms(t: Trainer, first: int, n: int) -> tuple[float, float]:
    """Host ms per step to issue steps first..first+n-1 while a sleep kernel queued ahead holds the GPU, so
    no launch waits for the device or for queue space and only the host's own work is timed; and the
    sleep's ms. A step that waited on the device inside would take about as long as the sleep."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000_000)  # cycles: about half a second
    end.record()
    t0 = time.perf_counter()
    for s in range(first, first + n):
        t.train_step(s)
    issued = time.perf_counter() - t0
    t.settle()
    torch.cuda.synchronize()
    return issued / n * 1e3, start.elapsed_time(end)


def _short(path: str) -> str:
    """A file outside moe_train by its last two path parts (torch/cuda/graphs.py → cuda/graphs.py)."""
    return "/".join(path.split(os.sep)[-2:])


def sync_sites(t: Trainer, first: int, n: int) -> collections.Counter:
    """Host synchronisations of steps first..first+n-1 by call site (the innermost three moe_train frames, or
    where none is on the stack the innermost three of any file, with the thread when it is not the main
    one): `torch.cuda.set_sync_debug_mode` warns at each synchronising CUDA call (a scalar read, a blocking
    copy), from the Python frame that made it."""
    import threading
    import traceback
    import warnings

    sites: collections.Counter = collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        frames = [f for f in stack if "moe_train/" in f.filename] or stack
        where = " < ".join(
            f"{f.filename.split('moe_train/')[-1] if 'moe_train/' in f.filename else _short(f.filename)}:"
            f"{f.lineno}"
            for f in frames[::-1][:3]
        )
        thread = threading.current_thread().name
        sites[(where or "?") + ("" if thread == "MainThread" else f" [{thread}]")] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for s in range(first, first + n):
                t.train_step(s)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    t.settle()
    return sites


def run_steps(t: Trainer, first: int, n: int) -> float:
    """Seconds for steps first..first+n-1, the device drained before and after, their records read back."""
    sync = torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(first, first + n):
        t.train_step(s)
    t.settle()  # the window's records read back, as a log record at its end would
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top", type=int, default=15, help="host-side ops listed")
    ap.add_argument("--sites", type=int, default=0, help="call sites listed by ops issued (0: none)")
    a, overrides = ap.parse_known_args()
    from torch.profiler import ProfilerActivity, profile

    run_dir = tempfile.mkdtemp(prefix="step_profile_")
    base = ["trainer.progress=false", "trainer.resume=none", "trainer.eval_every=100000"]
    base.append("logger.console=false")
    base.append(f"trainer.max_steps={2 * a.warmup + 3 * a.steps + 2 * ISSUED}")
    cfg = to_object(load_config([*base, *overrides]))
    cfg.run_dir = run_dir
    t = Trainer(cfg, run_dir)
    run_steps(t, 0, a.warmup)
    plain = run_steps(t, a.warmup, a.steps) / a.steps
    cuda = t.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        wall = run_steps(t, a.warmup + a.steps, a.steps) / a.steps
    events = prof.events()
    device_iv = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    ]
    blocked = [e for e in events if any(b in e.name for b in BLOCKING) and "Async" not in e.name]
    blocked += [e for e in events if e.name == "cudaMemcpyAsync" and e.cpu_time_total > 50]  # waited
    blocked_ms = union_ms([(e.time_range.start, e.time_range.end) for e in blocked]) / a.steps
    gpu_ms = union_ms(device_iv) / a.steps
    host_ms = wall * 1e3 - blocked_ms
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, overrides: {' '.join(overrides)}")
    print("| wall ms (profiler off) | wall ms (on) | GPU-busy ms | host ms | blocked ms | syncs/step |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {plain * 1e3:.1f} | {wall * 1e3:.1f} | {gpu_ms:.1f} | {host_ms:.1f} | {blocked_ms:.1f} "
        f"| {len(blocked) / a.steps:.1f} |"
    )
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=50))
    if cuda:  # where the device time goes, for the same steps
        print(averages.table(sort_by="self_cuda_time_total", row_limit=a.top, max_name_column_width=50))
    if cuda:
        host, slept = issue_ms(t, a.warmup + 3 * a.steps, ISSUED)
        print(
            f"host ms to issue a step with the GPU held busy (no waits on the device): {host:.1f} "
            f"(GPU-busy {gpu_ms:.1f}; the sleep ahead {slept:.0f} ms)"
        )
        sites = sync_sites(t, a.warmup + 3 * a.steps + ISSUED, ISSUED)
        print(f"| syncs/step | where (innermost moe_train frames, {ISSUED} steps) |\n|---:|---|")
        for where, n in sites.most_common():
            print(f"| {n / ISSUED:.1f} | {where} |")
    if a.sites:
        # verbose: keep the Python tracer's call events among the events (op_sites' fallback reads them)
        verbose = torch._C._profiler._ExperimentalConfig(verbose=True)
        with profile(activities=acts, with_stack=True, experimental_config=verbose) as prof:
            run_steps(t, a.warmup + 2 * a.steps, a.steps)
        print("| ops/step | op | call site (innermost moe_train frame) |\n|---:|---|---|")
        for (op, where), n in op_sites(prof.events()).most_common(a.sites):
            print(f"| {n / a.steps:.1f} | {op} | {where} |")


if __name__ == "__main__":
    main()

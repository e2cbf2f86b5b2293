"""Pipeline step time, 1F1B vs DualPipeV (pp=2), and the measured bubble against the analytic one.

Run on a 2-GPU machine:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 2 bench/pipeline.py [--layers 8 --microbatches 8 --seq 4096]

Both schedules run the same model (a DeepSeek-V2-Lite-shaped proxy, bf16 weights, no MTP) on the same
micro-batches, forward + backward only (no optimizer step: it is the same for both schedules). Each action's
GPU time is taken with CUDA events around it, so a rank's busy time is the sum over its actions and the
measured bubble fraction is 1 − busy / step time (the slowest rank's view). The analytic bubble comes from
`moe_train.parallel.pipeline.analysis` fed with the measured mean F, B, W durations.
`--smoke` runs a tiny model on CPU/gloo to check the script.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_throughput import proxy_config  # noqa: E402
from moe_train.config import ModelConfig  # noqa: E402
from moe_train.model.moe import BalanceLoss  # noqa: E402
from moe_train.parallel.pipeline.analysis import Durations, idle_per_rank  # noqa: E402
from moe_train.parallel.pipeline.executor import PipelineExecutor  # noqa: E402
from moe_train.parallel.pipeline.schedules import Kind, build_schedule  # noqa: E402
from moe_train.parallel.pipeline.stages import rank_model_and_stages  # noqa: E402


def proxy(layers: int, smoke: bool) -> ModelConfig:
    """The training-throughput yardstick's shape (DeepSeek-V2-Lite, no MTP), or its tiny CPU twin."""
    return proxy_config(layers, tiny=smoke)


class ActionTimer:
    """Times each action of an executor, minus the receives inside it (a receive waits for the peer: that
    is bubble, not work). CUDA events on GPU, wall clock on CPU."""

    def __init__(self, ex: PipelineExecutor, cuda: bool) -> None:
        self.ex, self.cuda = ex, cuda
        self.records: list[tuple[Kind, object, object, list]] = []
        self.recvs: list | None = None
        self.orig_part, self.orig_recv = ex._run_part, ex._recv
        ex._run_part, ex._recv = self.run_part, self.recv

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def recv(self, *args):
        start = self._mark()
        out = self.orig_recv(*args)
        self.recvs.append((start, self._mark()))
        return out

    def run_part(self, part, ctx) -> None:
        self.recvs = []
        start = self._mark()
        self.orig_part(part, ctx)
        self.records.append((part.kind, start, self._mark(), self.recvs))

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def durations_ms(self) -> list[tuple[Kind, float]]:
        if self.cuda:
            torch.cuda.synchronize()
        return [(k, self._ms(s, e) - sum(self._ms(a, b) for a, b in rv)) for k, s, e, rv in self.records]


def run(name: str, cfg: ModelConfig, micro: list[torch.Tensor], device, dtype, steps: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    sch = build_schedule(name, world, len(micro))
    model, stages, _ = rank_model_and_stages(cfg, sch, rank, BalanceLoss("seq", 1e-4), device, 0, None)
    model.to(dtype)
    for m in model.moe_layers():
        m.gate.float()  # the router stays fp32, as in training
    ex = PipelineExecutor(sch, rank, stages, list(range(world)), None, cfg.hidden_size, dtype)
    weights = [1 / len(micro)] * len(micro)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        ex.run(micro, weights, 0.0)
        model.zero_grad(set_to_none=True)
    sync()
    dist.barrier()
    timer = ActionTimer(ex, device.type == "cuda")
    t0 = time.perf_counter()
    for _ in range(steps):
        ex.run(micro, weights, 0.0)
        model.zero_grad(set_to_none=True)
    sync()
    step = (time.perf_counter() - t0) / steps * 1e3
    parts = timer.durations_ms()
    busy = sum(d for _, d in parts) / steps
    by_kind: dict[Kind, list[float]] = {}
    for k, d in parts:
        by_kind.setdefault(k, []).append(d)
    stats = torch.tensor([step, busy], device=device)
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    mean = {k.value: sum(v) / len(v) for k, v in by_kind.items()}
    del model, stages, ex
    return {
        "step": max(float(g[0]) for g in gathered),
        "busy": [float(g[1]) for g in gathered],
        "mean": mean,
        "schedule": sch,
    }


def analytic_fraction(sch, mean: dict[str, float]) -> float:
    f = mean.get("F", 0.0)
    if "B" in mean:
        b, w = mean["B"], mean.get("W", 0.0)
    else:  # 1F1B: only full backwards; the split does not matter for its bubble
        b, w = mean.get("BW", 0.0), 0.0
    d = Durations(f=f, b=b, w=w)
    idle = idle_per_rank(sch, d)
    busy = [sum(d.of(p) for a in acts for p in a.parts()) for acts in sch.ranks]
    return max(i / (i + bz) for i, bz in zip(idle, busy, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.barrier()  # NCCL: batched p2p must not be the first collective of the group
    dtype = torch.bfloat16 if cuda else torch.float32
    seq = 32 if args.smoke else args.seq
    cfg = proxy(args.layers, args.smoke)
    g = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=g) for _ in range(args.microbatches)]
    rows = []
    for name in ("1f1b", "dualpipev"):
        r = run(name, cfg, micro, device, dtype, args.steps)
        measured = max(1 - b / r["step"] for b in r["busy"])
        rows.append(
            f"| {name} | {r['step']:.1f} | {' / '.join(f'{b:.1f}' for b in r['busy'])} | {measured:.1%} | "
            f"{analytic_fraction(r['schedule'], r['mean']):.1%} | "
            f"{', '.join(f'{k} {v:.1f}' for k, v in sorted(r['mean'].items()))} |"
        )
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        head = [
            f"{dist.get_world_size()} ranks, {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}, "
            f"torch {torch.__version__}; {args.layers} layers, "
            f"{args.microbatches} micro-batches of 1 × {seq}",
            "",
            "| schedule | step ms | busy ms per rank | measured bubble | analytic bubble | mean action ms |",
            "|---|---|---|---|---|---|",
        ]
        text = "\n".join(head + rows)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One F&B pair on a DeepSeek-V3-shaped MoE block, ep=2: how much of the all-to-all the overlap hides.

Run on a 2-GPU machine:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 2 bench/overlap.py [--tokens 4096] [--out DIR]
CPU check of the script: OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/overlap.py --smoke

The block is one DeepSeek-V3 MoE decoder layer (hidden 7168, MLA with 128 heads, q/kv latents 1536/512, 256
routed experts top-8 in 8 groups (4 per token), expert width 2048, one shared expert), bf16 weights, fp32
router; each rank holds 128 experts. Each rank runs the forward of micro-batch 1 and the full backward (input
and weight gradients) of micro-batch 0, `--tokens` tokens each, through the overlap engine:

(a) compute alone: the overlapped pair with every all-to-all replaced by a copy of what it received in a
    recorded run (same kernels, same host program and syncs, no communication);
(b) communication alone: the pair's all-to-alls, replayed back to back with their recorded splits;
(c) sequential: the engine's forward program, then its backward program (no interleaving; the forward
    still hides its dispatch under the shared experts); (c0) the plain path (parallel.overlap=false:
    autograd with the blocking dispatcher) for reference;
(d) overlapped: `overlap.pair(forward, backward)`.
Exposed communication = (d) − (a). Times are the slowest rank's mean over --iters pairs. A torch.profiler
trace of one overlapped pair (rank 0) gives the same from the GPU's side: the time NCCL kernels run beside
compute kernels, against a trace of the compute-alone replay (how much slower compute ran beside NCCL);
`overlap_trace_TAG_{alone,overlapped}.json` and the streams' timeline (`overlap_timeline_TAG.png`) go to
--out.
The pair's stage output and input gradient are checked against the sequential run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, sync  # noqa: E402
from moe_train.config import ModelConfig  # noqa: E402
from moe_train.model import MoEStats, Transformer  # noqa: E402
from moe_train.model.moe import BalanceLoss, Router  # noqa: E402
from moe_train.model.norm import RMSNorm  # noqa: E402
from moe_train.parallel.expert import apply_expert_parallel, expert_slice  # noqa: E402
from moe_train.parallel.mesh import build_mesh  # noqa: E402
from moe_train.parallel.overlap import OverlapEngine, drain, pair  # noqa: E402


def dsv3_block(smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(
            vocab_size=97, hidden_size=64, num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=8,
            num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=0,
        )  # fmt: skip
    return ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        moe_intermediate_size=2048,
        num_hidden_layers=1,
        first_k_dense_replace=0,
        num_attention_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        num_nextn_predict_layers=0,
    )


def build_block(cfg: ModelConfig, mesh, device, dtype) -> Transformer:
    """The block with this rank's experts, random N(0, 0.02) weights (no per-name init: fast), router fp32."""
    with torch.device("meta"):
        model = Transformer(cfg, BalanceLoss(), expert_slice(cfg.n_routed_experts, mesh), [0], False, False)
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.float()
    model.to_empty(device=device)
    model.rotary.reset()
    g = torch.Generator(device=device).manual_seed(1234 + mesh.rank)
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if isinstance(m, RMSNorm):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
            for b in m.buffers(recurse=False):
                if b.is_floating_point() and isinstance(m, Router):
                    b.zero_()
    apply_expert_parallel(model, mesh)
    return model


class A2ARecorder:
    """Wraps `dist.all_to_all_single`: 'record' keeps each call's output (and sizes), 'replay' writes the
    recorded output instead of communicating (compute alone), 'pass' forwards."""

    def __init__(self) -> None:
        self.real = dist.all_to_all_single
        self.mode = "pass"
        self.calls: list[dict] = []
        self.i = 0

    def __call__(
        self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        if self.mode == "replay":
            output.copy_(self.calls[self.i]["out"])
            self.i += 1
            return _Done() if async_op else None
        work = self.real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
        if self.mode == "record":
            self.calls.append(
                {
                    "out": output,
                    "in": input,
                    "out_splits": output_split_sizes,
                    "in_splits": input_split_sizes,
                    "group": group,
                }
            )
        return work

    def freeze(self) -> None:
        """After a recorded run (synchronised): keep copies of what each call received."""
        for c in self.calls:
            c["out"] = c["out"].clone()
            c["in"] = c["in"].clone()

    def replay_comm(self) -> None:
        """The recorded exchanges alone, back to back on the communicator, then waited."""
        works = [
            self.real(torch.empty_like(c["out"]), c["in"], c["out_splits"], c["in_splits"], group=c["group"],
                      async_op=True)
            for c in self.calls
        ]  # fmt: skip
        for w in works:
            w.wait()

    def bytes_out(self) -> int:
        return sum(c["in"].numel() * c["in"].element_size() for c in self.calls)


class _Done:
    def wait(self) -> bool:
        return True


def slowest(seconds: float, device) -> float:
    t = torch.tensor([seconds], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t) * 1e3


def timed_ms(setup: Callable[[], object], fn: Callable[[object], object], iters: int, device) -> float:
    """Mean ms of fn(setup()) over iters, setup untimed (the slowest rank's view)."""
    total = 0.0
    for _ in range(iters):
        arg = setup()
        sync(device.type)
        dist.barrier()
        t0 = time.perf_counter()
        fn(arg)
        sync(device.type)
        total += time.perf_counter() - t0
    return slowest(total / iters, device)


def trace_overlap(trace_path: str) -> dict:
    """From a Chrome trace: GPU time of NCCL kernels, of compute kernels, and of NCCL time with compute
    running beside it (interval unions over the pair's span)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {}

    def union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[list[float]] = []
        for a, b in sorted(iv):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]

    def length(iv) -> float:
        return sum(b - a for a, b in iv)

    def intersect(x, y) -> float:
        i = j = 0
        tot = 0.0
        while i < len(x) and j < len(y):
            lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
            tot += max(0.0, hi - lo)
            if x[i][1] < y[j][1]:
                i += 1
            else:
                j += 1
        return tot

    comm = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()])
    comp = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()])
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    hidden = intersect(comm, comp)
    return {
        "span_ms": span / 1e3,
        "comm_ms": length(comm) / 1e3,
        "compute_ms": length(comp) / 1e3,
        "hidden_ms": hidden / 1e3,
        "exposed_ms": (length(comm) - hidden) / 1e3,
        "idle_ms": (span - length(union(comm + comp))) / 1e3,
    }


def trace_pair(
    setup: Callable[[], object], fn: Callable[[object], object], path: str, rank: int, device
) -> dict:
    """Profile fn(setup()) on every rank; rank 0 writes its Chrome trace to `path` and returns
    `trace_overlap` of it. The profiler first runs a whole pair unrecorded: its start-up (CUPTI, ~0.5 s)
    differs between ranks, and a rank still starting would hold its peer's first exchange."""
    from torch.profiler import ProfilerActivity, profile, schedule

    tape = setup()
    sync(device.type)
    dist.barrier()
    ready = (lambda p: p.export_chrome_trace(path)) if rank == 0 else (lambda p: None)
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []),
        schedule=schedule(wait=0, warmup=1, active=1),
        on_trace_ready=ready,
    ) as prof:
        fn(tape)  # warm-up, not recorded
        tape = setup()
        sync(device.type)
        dist.barrier()
        prof.step()
        fn(tape)  # recorded
        sync(device.type)
        prof.step()
    return trace_overlap(path) if rank == 0 else {}


def draw_timeline(trace_path: str, png: str, title: str) -> None:
    """The pair's GPU work on rank 0, one row per CUDA stream; the compute stream's kernels are split by the
    thread that launched them — the forward's on the main thread, the backward's on autograd's device
    thread — and above them the forward's sub-steps as the GPU ran them (the engine's profiler ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return
    t0 = min(e["ts"] for e in kernels)
    launcher = {  # kernel correlation id -> the thread that launched it (runtime or driver API)
        e["args"]["correlation"]: e["tid"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    main_tid = next((e["tid"] for e in events if e.get("cat") == "user_annotation"), None)
    spans = [
        e for e in events if e.get("cat") == "gpu_user_annotation" and "dur" in e and e["name"][:2] == "F "
    ]
    nccl = {e["args"].get("stream", 0) for e in kernels if "nccl" in e["name"].lower()}
    rows: list[tuple[str, list[dict], str]] = []
    if spans:
        rows.append(("F sub-steps", spans, "tab:green"))
    for s in sorted({e["args"].get("stream", 0) for e in kernels}):
        ks = [e for e in kernels if e["args"].get("stream", 0) == s]
        if s in nccl:
            rows.append((f"stream {s}: NCCL", ks, "tab:orange"))
            continue
        fwd = [e for e in ks if launcher.get(e["args"].get("correlation")) in (main_tid, None)]
        bwd = [e for e in ks if e not in fwd]
        rows.append((f"stream {s}: F (main thread)", fwd, "tab:blue"))
        if bwd:
            rows.append((f"stream {s}: B (autograd thread)", bwd, "tab:purple"))
    fig, ax = plt.subplots(figsize=(16, 1.2 + 0.55 * len(rows)))
    for y, (label, evs, color) in enumerate(rows):
        bars = [((e["ts"] - t0) / 1e3, e["dur"] / 1e3) for e in evs]
        ax.broken_barh(bars, (y - 0.4, 0.8), color=color, edgecolor="white", linewidth=0.3)
        if label == "F sub-steps":
            for e, (x, w) in zip(evs, bars, strict=True):
                if w > 0.3:
                    ax.text(x + w / 2, y, e["name"].split()[1], ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("ms (rank 0, one overlapped F&B pair)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch and rank")
    ap.add_argument("--seq", type=int, default=0, help="sequence length (0: one sequence of --tokens)")
    ap.add_argument(
        "--sm-carveout",
        default="0,4",
        help="comma-separated SM carveouts (parallel.overlap_sm_carveout) to time (d) with, e.g. 0,8,16",
    )
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tag", default="nvlink", help="names the output files and the run (e.g. the transport)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--draw", metavar="TRACE", help="only render TRACE (a trace this script wrote) to --png")
    ap.add_argument("--png", default="overlap_timeline.png")
    args = ap.parse_args()
    if args.draw:
        draw_timeline(args.draw, args.png, f"DSV3 block, ep=2, {args.tag}: one overlapped F&B pair")
        return
    mesh = build_mesh(ep=2, device="cpu" if args.smoke else "cuda")
    device, rank = mesh.device, mesh.rank
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = 32 if args.smoke else args.tokens
    seq = args.seq or tokens
    if tokens % seq:
        raise SystemExit(f"--tokens {tokens} must be a multiple of --seq {seq}")
    carveouts = [int(k) for k in args.sm_carveout.split(",")]
    cfg = dsv3_block(args.smoke)
    model = build_block(cfg, mesh, device, dtype)
    g = torch.Generator(device=device).manual_seed(7 + rank)
    x0, x1, grad = (
        torch.randn(tokens // seq, seq, cfg.hidden_size, generator=g, device=device, dtype=dtype)
        for _ in "abc"
    )
    engine = OverlapEngine()

    def fwd(x):
        x = x.detach().requires_grad_(True)
        stats = MoEStats()
        return engine.forward(model.program(x, stats, phases=True), x, stats, 1.0)

    def setup():
        model.zero_grad(set_to_none=True)
        return drain(fwd(x0))

    def sequential(tape):
        out = drain(fwd(x1))
        return out, drain(engine.backward(tape, grad))

    def overlapped(tape):
        return pair(fwd(x1), engine.backward(tape, grad))

    layer = model.layers["0"]

    def plain_setup():
        model.zero_grad(set_to_none=True)
        x = x0.detach().requires_grad_(True)
        return layer(x, MoEStats())

    def plain(h0):
        h1 = layer(x1.detach().requires_grad_(True), MoEStats())
        torch.autograd.backward([h0], [grad])
        return h1

    for _ in range(2):  # warm-up (Triton and cuDNN first calls)
        overlapped(setup())
        sequential(setup())
        plain(plain_setup())
    sync(device.type)
    # correctness: the overlapped pair computes what the sequential one does
    tape = setup()
    out_s, gx_s = sequential(tape)
    grads_s = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    tape = setup()
    out_o, gx_o = overlapped(tape)
    grads_o = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def rel(a, b) -> float:
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    err = max(
        rel(out_o.output, out_s.output),
        rel(gx_o, gx_s),
        max(rel(a, b) for a, b in zip(grads_o, grads_s, strict=True)),
    )
    assert err < 1e-2, f"overlapped pair differs from the sequential one: {err}"
    del out_s, out_o, gx_s, gx_o, grads_s, grads_o

    rec = A2ARecorder()
    dist.all_to_all_single = rec
    try:
        tape = setup()
        sync(device.type)
        rec.mode = "record"
        overlapped(tape)
        sync(device.type)
        rec.mode = "pass"
        rec.freeze()
        calls = len(rec.calls)
        mb_out = rec.bytes_out() / 2**20

        def replayed(tape):
            rec.mode, rec.i = "replay", 0
            overlapped(tape)
            rec.mode = "pass"

        a = timed_ms(setup, replayed, args.iters, device)
        b = timed_ms(lambda: None, lambda _: rec.replay_comm(), args.iters, device)
        a_k, d_k = {}, {}  # per SM carveout: compute alone under it, overlapped
        for k in carveouts:
            engine.sm_carveout = k
            a_k[k] = timed_ms(setup, replayed, args.iters, device) if k else a
            d_k[k] = timed_ms(setup, overlapped, args.iters, device)
        best = min(carveouts, key=lambda k: d_k[k])
        engine.sm_carveout = best
        traces = {}  # GPU view of one pair, compute alone (replayed) and overlapped, under the best carveout
        if cuda or args.smoke:  # (the smoke run checks the profiling steps; CPU traces hold no kernels)
            for what, fn in (("alone", replayed), ("overlapped", overlapped)):
                path = os.path.join(args.out, f"overlap_trace_{args.tag}_{what}.json")
                traces[what] = trace_pair(setup, fn, path, rank, device)
                if rank == 0 and what == "overlapped" and cuda:
                    title = (
                        f"DSV3 block, ep=2, {tokens} tokens/rank, {args.tag}, SM carveout {best}: "
                        "compute (blue) and NCCL (orange)"
                    )
                    draw_timeline(path, os.path.join(args.out, f"overlap_timeline_{args.tag}.png"), title)
        engine.sm_carveout = 0
    finally:
        dist.all_to_all_single = rec.real
    c = timed_ms(setup, sequential, args.iters, device)
    c0 = timed_ms(plain_setup, plain, args.iters, device)
    assert engine.max_in_flight <= 2, engine.max_in_flight

    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        lines = [
            f"2 ranks, {name}, torch {torch.__version__}, ep=2, {tokens} tokens per micro-batch and rank "
            f"({tokens // seq} × {seq}), {'bf16' if cuda else 'fp32'}, {args.tag}",
            f"one F&B pair: {calls} all-to-alls, {mb_out:.1f} MiB leaving each rank; overlapped vs "
            f"sequential max relative difference {err:.1e}; max in flight {engine.max_in_flight} exchanges",
            "",
            "| (a) compute alone | (b) comm alone | (c) sequential F then B | (c0) plain, overlap=false | "
            "SM carveout | (a') compute alone, carveout | (d) overlapped F&B | exposed comm (d)−(a) | "
            "exposed / (d) | (d) / max(a, b) | comm / compute |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in carveouts:
            dk = d_k[k]
            lines.append(
                f"| {a:.2f} ms | {b:.2f} ms | {c:.2f} ms | {c0:.2f} ms | {k} | {a_k[k]:.2f} ms | "
                f"{dk:.2f} ms | {dk - a:.2f} ms | {(dk - a) / dk:.1%} | {dk / max(a, b):.2f} | {b / a:.2f} |"
            )
        if any(traces.values()):
            lines += [
                "",
                f"Profiler traces of one pair (rank 0, SM carveout {best}, GPU kernel time, ms; the profiler "
                "warmed up on a pair before):",
                "",
                "| pair | span | compute kernels | NCCL kernels | NCCL beside compute | NCCL exposed | "
                "GPU idle |",
                "|---|---|---|---|---|---|---|",
            ]
            for what, t in traces.items():
                lines.append(
                    f"| {what} | {t['span_ms']:.2f} | {t['compute_ms']:.2f} | {t['comm_ms']:.2f} | "
                    f"{t['hidden_ms']:.2f} ({t['hidden_ms'] / max(t['comm_ms'], 1e-9):.0%}) | "
                    f"{t['exposed_ms']:.2f} | {t['idle_ms']:.2f} |"
                )
        emit(lines, os.path.join(args.out, f"overlap_{args.tag}.md"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

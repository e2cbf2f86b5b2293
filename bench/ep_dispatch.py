"""Expert-parallel dispatch/combine bandwidth vs a raw all-to-all, and one MoE layer at ep=1 vs ep=2.

Run on a 2-GPU machine:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 2 bench/ep_dispatch.py [--out results.md] [--profile]
CPU check of the script: OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/ep_dispatch.py --smoke

(0) On CUDA with Triton, the bag-sum kernels (ops/gather_triton.py) against fp32 references on random
bags (asserted tolerance) and their time against `embedding_bag`, the reference path.
(1) For several token counts and hidden sizes, the dispatcher's full dispatch+combine (plan with its count
exchange, permutation, two all-to-alls, regroup, weighted combine) is timed against raw `all_to_all_single`
calls that move exactly the same rows with the same splits. Bandwidth = bytes leaving a rank (both
directions, every row including the rank's own share, as all_to_all_single counts them) / time. Beside it,
the parts: the plan alone, and the row work alone (send gather, expansion to expert slots, weighted combine,
final sum; same kernels and sizes, no communication). "counts+sync" times the one step any dispatcher on
`all_to_all_single` with uneven splits takes before a row can move — the count exchange read on the host —
and "ceiling" the best ours/raw such a dispatcher could reach at that size if everything else were free.
(2) One DeepSeek-V2-Lite-sized MoE layer (64 experts top-6, hidden 2048, expert width 1408, 2 shared),
forward+backward per rank for the same tokens per rank: ep=1 (every GPU holds all experts, pure data
parallel) vs ep=2 (each holds 32, tokens exchanged); outputs and input gradients of the two are compared.
--profile: compact torch.profiler tables (device and host time per op) for the smallest and largest case.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import dispatch_combine, emit, sync, timed  # noqa: E402
from moe_train.config import ModelConfig  # noqa: E402
from moe_train.model.init import init_weights  # noqa: E402
from moe_train.model.moe import MoE, MoEOptions  # noqa: E402
from moe_train.model.phases import run  # noqa: E402
from moe_train.ops.gather import gather_rows  # noqa: E402
from moe_train.parallel.dispatch import AllToAllDispatcher  # noqa: E402
from moe_train.parallel.dispatch.rows import (  # noqa: E402
    expand_to_slots,
    slot_sums,
    sum_over_route,
)
from moe_train.parallel.mesh import build_mesh  # noqa: E402

DEV = "cuda"
SIZES = {
    "hidden": (2048, 7168),
    "tokens": (1024, 4096, 16384),
    "layer_tokens": (4096, 16384),
    "layer_hidden": 2048,
}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def profile_table(fn, label: str, rank: int, n: int = 5) -> None:
    """Top ops of n calls by device time and by host time (rank 0 prints), per call."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts):  # the first session starts the profiler (slow, different per rank)
        fn()
        sync(DEV)
    dist.barrier()
    with profile(activities=acts) as prof:
        sync(DEV)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(DEV)
        wall = (time.perf_counter() - t0) / n
    if rank != 0:
        return
    ev = prof.key_averages()
    busy = sum(e.self_device_time_total for e in ev) / n / 1e3
    ops = sum(e.count for e in ev if e.key.startswith(("aten::", "c10d::"))) / n
    print(
        f"== profile {label}: {wall * 1e3:.3f} ms/call under the profiler, kernels {busy:.3f} ms, "
        f"{ops:.0f} aten/c10d ops per call",
        flush=True,
    )
    print("   device ms/call  calls  op")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:12]:
        if e.self_device_time_total > 0:
            print(f"   {e.self_device_time_total / n / 1e3:12.3f}  {e.count / n:5.1f}  {e.key[:80]}")
    syncs: dict[str, int] = {}  # which ops copy to or wait for the device (host syncs and their callers)
    for e in prof.events():
        if e.name in ("cudaMemcpyAsync", "cudaStreamSynchronize"):
            chain, p = [], e.cpu_parent
            while p is not None:
                chain.append(p.name)
                p = p.cpu_parent
            key = f"{e.name} <- {' <- '.join(chain[:3])}"
            syncs[key] = syncs.get(key, 0) + 1
    for key, c in sorted(syncs.items(), key=lambda kv: -kv[1]):
        print(f"   {c / n:5.1f}/call  {key[:140]}")
    print("   host self ms/call  calls  op")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"   {e.self_cpu_time_total / n / 1e3:15.3f}  {e.count / n:5.1f}  {e.key[:80]}", flush=True)


def check_kernels(rows: list[str]) -> None:
    """Triton bag sums vs fp32 references (asserted), and their time vs embedding_bag (bf16, CUDA)."""
    from moe_train.ops import gather_triton as gt

    g = torch.Generator(device=DEV).manual_seed(0)
    for hidden, n_src in ((7168, 4096), (2048, 3000), (8, 500), (100, 77)):
        counts = torch.randint(0, 8, (n_src // 3 + 1,), device=DEV, generator=g)
        counts[-1] = 0
        n = int(counts.sum())
        src = torch.randn(n, hidden, device=DEV, generator=g).to(torch.bfloat16)
        index = torch.randperm(n, device=DEV, generator=g)
        offsets = F.pad(counts.cumsum(0), (1, 0))
        owner = torch.repeat_interleave(torch.arange(counts.numel(), device=DEV), counts)
        w = torch.rand(n, device=DEV, generator=g)
        grad = torch.randn(counts.numel(), hidden, device=DEV, generator=g).to(torch.bfloat16)

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

        ref_w = F.embedding_bag(
            index, src.float(), offsets, mode="sum", per_sample_weights=w, include_last_offset=True
        )
        ref_u = F.embedding_bag(index, src.float(), offsets, mode="sum", include_last_offset=True)
        errs = {
            "weighted": rel(gt.bag_sum(src, index, offsets, w), ref_w),
            "unweighted": rel(gt.bag_sum(src, index, offsets, None), ref_u),
            "scaled gather": rel(gt.bag_sum(src, index, None, w), src.float()[index] * w[:, None]),
            "dots": rel(
                gt.bag_dots(grad, src, index, offsets), (grad.float()[owner] * src.float()[index]).sum(1)
            ),
        }
        x = torch.randn(counts.numel(), hidden, device=DEV, generator=g).to(torch.bfloat16)
        src_bag = torch.empty_like(index).index_copy_(0, index, owner)  # bag of each position
        scattered = gt.bag_scatter(x, index, offsets, n)
        assert torch.equal(scattered, x[src_bag]), hidden  # a copy: exact
        worst = max(errs.values())
        assert worst < 4e-3, (hidden, errs)  # bf16 output rounding only (fp32 inside)
        rows.append(f"| {hidden} | {n} | " + " | ".join(f"{v:.1e}" for v in errs.values()) + " |")
    # time at the combine's shape: 32768 received rows, 4 slots each, hidden 7168
    hidden, bags, per = 7168, 32768, 4
    src = torch.randn(bags * per, hidden, device=DEV, dtype=torch.bfloat16)
    index = torch.randperm(bags * per, device=DEV)
    offsets = torch.arange(bags + 1, device=DEV) * per
    w = torch.rand(bags * per, device=DEV)
    t_tri = timed(lambda: gt.bag_sum(src, index, offsets, w), 10, DEV)
    wb = w.to(torch.bfloat16)
    t_eb = timed(
        lambda: F.embedding_bag(
            index, src, offsets, mode="sum", per_sample_weights=wb, include_last_offset=True
        ),
        10,
        DEV,
    )
    gb = (src.numel() + bags * hidden) * 2 / 1e9
    # the expansion: 32768 rows copied to 4 positions each, from the source side vs index_select
    rows_src = src[:bags].contiguous()
    row_of = torch.empty_like(index).index_copy_(0, index, torch.arange(bags * per, device=DEV) // per)
    t_sc = timed(lambda: gt.bag_scatter(rows_src, index, offsets, bags * per), 10, DEV)
    t_is = timed(lambda: rows_src.index_select(0, row_of), 10, DEV)
    rows.append(
        f"\nweighted bag sum, {bags} bags × {per} rows × {hidden}: Triton {t_tri * 1e3:.3f} ms "
        f"({gb / t_tri:.0f} GB/s read+write), embedding_bag {t_eb * 1e3:.3f} ms ({gb / t_eb:.0f} GB/s); "
        f"expansion of the same rows: bag_scatter {t_sc * 1e3:.3f} ms ({gb / t_sc:.0f} GB/s), "
        f"index_select {t_is * 1e3:.3f} ms"
    )


def routing(tokens: int, n_experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(tokens, n_experts, device=DEV, generator=g)
    w, idx = scores.topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).float()


def bench_dispatch(mesh, rows: list[str], profile: bool) -> None:
    ep_group = mesh.group("ep")
    disp = AllToAllDispatcher(ep_group, 2, mesh.ep_rank)
    n_experts, k = 256, 8  # DeepSeek-V3 routing
    dt = DTYPE[DEV]
    # The step every dispatcher built on all_to_all_single with uneven splits must take before any row
    # moves: exchange the counts and read them on the host (split sizes size the buffers).
    counts = torch.ones(2, 1 + n_experts // 2, dtype=torch.long, device=DEV)
    got = torch.empty_like(counts)

    def counts_sync() -> None:
        dist.all_to_all_single(got, counts, group=ep_group)
        got.tolist()

    t_sync = timed(counts_sync, 50, DEV)
    for hidden in SIZES["hidden"]:
        for tokens in SIZES["tokens"]:
            x = torch.randn(tokens, hidden, device=DEV, dtype=dt)
            idx, w = routing(tokens, n_experts, k, seed=mesh.rank * 1000 + tokens)
            with torch.no_grad():
                _, plan = dispatch_combine(disp, x, idx, w, n_experts)
            r = plan.route
            send_rows, recv_rows = sum(r.send_splits), sum(r.recv_splits)
            a = torch.randn(send_rows, hidden, device=DEV, dtype=dt)
            b = torch.randn(recv_rows, hidden, device=DEV, dtype=dt)
            out_a = torch.empty(recv_rows, hidden, device=DEV, dtype=dt)
            out_b = torch.empty(send_rows, hidden, device=DEV, dtype=dt)
            y = torch.randn(plan.slots.slot_row.shape[0], hidden, device=DEV, dtype=dt)

            def raw(out_a=out_a, a=a, out_b=out_b, b=b, r=r) -> None:
                dist.all_to_all_single(out_a, a, r.recv_splits, r.send_splits, group=ep_group)
                dist.all_to_all_single(out_b, b, r.send_splits, r.recv_splits, group=ep_group)

            def ours(x=x, idx=idx, w=w) -> None:
                with torch.no_grad():
                    dispatch_combine(disp, x, idx, w, n_experts)

            def plan_only(idx=idx) -> None:
                with torch.no_grad():
                    run(disp.plan(idx, n_experts))

            def row_work(x=x, b=b, y=y, a=a, plan=plan) -> None:
                with torch.no_grad():
                    gather_rows(x, plan.route.pair_row, plan.route.rows)
                    expand_to_slots(b, plan.slots)
                    slot_sums(y, plan.slots)
                    sum_over_route(a, plan.route)

            biggest = hidden == SIZES["hidden"][-1] and tokens == SIZES["tokens"][-1]
            smallest = hidden == SIZES["hidden"][0] and tokens == SIZES["tokens"][0]
            if profile and (biggest or smallest):
                for _ in range(3):
                    ours()
                profile_table(ours, f"dispatch+combine {hidden}x{tokens}", mesh.rank)
            iters = 20 if tokens * hidden < 2**26 else 10
            t_raw, t_ours = timed(raw, iters, DEV), timed(ours, iters, DEV)
            t_plan, t_rows = timed(plan_only, iters, DEV), timed(row_work, iters, DEV)
            mb = (send_rows + recv_rows) * hidden * a.element_size() / 2**20  # both directions leave a rank
            rows.append(
                f"| {hidden} | {tokens} | {send_rows / tokens:.2f} | {mb:.1f} | {t_raw * 1e3:.3f} | "
                f"{mb / 1024 / t_raw:.0f} | {t_ours * 1e3:.3f} | {mb / 1024 / t_ours:.0f} | "
                f"{t_raw / t_ours:.0%} | {t_plan * 1e3:.3f} | {t_rows * 1e3:.3f} | {t_sync * 1e3:.3f} | "
                f"{t_raw / (t_raw + t_sync):.0%} |"
            )
            del a, b, out_a, out_b, y, plan


def bench_layer(mesh, rows: list[str]) -> None:
    h = SIZES["layer_hidden"]
    cfg = ModelConfig(
        vocab_size=1,
        hidden_size=h,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        n_shared_experts=2,
    )
    for tokens in SIZES["layer_tokens"]:
        x0 = torch.randn(1, tokens, h, device=DEV, dtype=DTYPE[DEV])
        up = torch.randn_like(x0)
        times, outs = {}, {}
        for ep in (1, 2):
            sl = None if ep == 1 else (mesh.ep_rank * 32, 32)
            with torch.device(DEV):
                moe = MoE(cfg, 1, MoEOptions(expert_slice=sl))
            init_weights(moe, 0, 0.02)
            moe.to(DTYPE[DEV])
            moe.gate.to(torch.float32)
            if ep == 2:
                moe.dispatcher = AllToAllDispatcher(mesh.group("ep"), 2, mesh.ep_rank)
            x = x0.clone().requires_grad_(True)

            def step(moe=moe, x=x, up=up) -> torch.Tensor:
                x.grad = None
                y = moe(x)
                y.backward(up)
                return y

            y = step()
            outs[ep] = (y.detach().float(), x.grad.float())
            times[ep] = timed(step, 10, DEV)
        # the same tokens and weights: ep=2 must give ep=1's output and input gradient (up to bf16 rounding)
        err = [float((outs[2][i] - outs[1][i]).norm() / outs[1][i].norm()) for i in (0, 1)]
        assert max(err) < 2e-2, err
        rows.append(
            f"| {tokens} | {times[1] * 1e3:.2f} | {times[2] * 1e3:.2f} | {err[0]:.1e} | {err[1]:.1e} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU/gloo, to check the script")
    ap.add_argument(
        "--profile", action="store_true", help="profiler tables for the smallest and largest case"
    )
    args = ap.parse_args()
    global DEV, SIZES
    if args.smoke:
        DEV, SIZES = "cpu", {"hidden": (64,), "tokens": (128,), "layer_tokens": (64,), "layer_hidden": 64}
    mesh = build_mesh(ep=2, device=DEV)
    kernel_rows: list[str] = []
    disp_rows: list[str] = []
    layer_rows: list[str] = []
    if DEV == "cuda":
        from moe_train.ops.gather_triton import available

        if available():
            check_kernels(kernel_rows)
    bench_dispatch(mesh, disp_rows, args.profile)
    bench_layer(mesh, layer_rows)
    if mesh.rank == 0:
        text = [
            f"GPUs: {torch.cuda.device_count()}x "
            f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'} | torch {torch.__version__} | "
            f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if DEV == 'cuda' else '-'}",
            "",
            "| kernel check: hidden | rows | weighted | unweighted | scaled gather | dots (rel. error) |",
            "|---|---|---|---|---|---|",
            *kernel_rows,
            "",
            "| hidden | tokens/rank | rows sent/token | MB/rank (both ways) | raw a2a ms | raw GB/s | "
            "dispatch+combine ms | ours GB/s | ours/raw | plan ms | row work ms | counts+sync ms | "
            "ceiling: raw/(raw + counts+sync) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *disp_rows,
            "",
            "| tokens/rank | MoE layer fwd+bwd ms, ep=1 | ep=2 | rel. diff output | rel. diff input grad |",
            "|---|---|---|---|---|",
            *layer_rows,
        ]
        emit(text, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

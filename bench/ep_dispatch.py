"""Expert-parallel dispatch/combine bandwidth vs a raw all-to-all, and one MoE layer at ep=1 vs ep=2.

Run on a 2-GPU machine:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 2 bench/ep_dispatch.py [--out results.md]

(1) For several token counts and hidden sizes, the dispatcher's full dispatch+combine (plan with its count
exchange, permutation, two all-to-alls, regroup, weighted combine) is timed against raw `all_to_all_single`
calls that move exactly the same rows with the same splits. Bandwidth = bytes leaving a rank (both
directions, every row including the rank's own share, as all_to_all_single counts them) / time.
(2) One DeepSeek-V2-Lite-sized MoE layer (64 experts top-6, hidden 2048, expert width 1408, 2 shared),
forward+backward per rank for the same tokens per rank: ep=1 (every GPU holds all experts, pure data
parallel) vs ep=2 (each holds 32, tokens exchanged).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, sync, timed  # noqa: E402
from moe_train.config import ModelConfig  # noqa: E402
from moe_train.model.init import init_weights  # noqa: E402
from moe_train.model.moe import MoE, MoEOptions  # noqa: E402
from moe_train.parallel.dispatch import AllToAllDispatcher  # noqa: E402
from moe_train.parallel.mesh import build_mesh  # noqa: E402

DEV = "cuda"
SIZES = {
    "hidden": (2048, 7168),
    "tokens": (1024, 4096, 16384),
    "layer_tokens": (4096, 16384),
    "layer_hidden": 2048,
}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
PROFILE = False


def profile_once(fn, rank: int) -> None:
    """Top ops of a few calls (rank 0 prints): where dispatch+combine spends host and device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            fn()
        sync(DEV)
    if rank == 0:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30), flush=True)


def routing(tokens: int, n_experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(tokens, n_experts, device=DEV, generator=g)
    w, idx = scores.topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).float()


def bench_dispatch(mesh, rows: list[str]) -> None:
    ep_group = mesh.group("ep")
    disp = AllToAllDispatcher(ep_group, 2, mesh.ep_rank)
    n_experts, k = 256, 8  # DeepSeek-V3 routing
    for hidden in SIZES["hidden"]:
        for tokens in SIZES["tokens"]:
            x = torch.randn(tokens, hidden, device=DEV, dtype=DTYPE[DEV])
            idx, w = routing(tokens, n_experts, k, seed=mesh.rank * 1000 + tokens)
            plan = disp.plan(idx, w, n_experts)
            send_rows, recv_rows = sum(plan.send_splits), sum(plan.recv_splits)
            dt = DTYPE[DEV]
            a = torch.randn(send_rows, hidden, device=DEV, dtype=dt)
            b = torch.randn(recv_rows, hidden, device=DEV, dtype=dt)
            out_a = torch.empty(recv_rows, hidden, device=DEV, dtype=dt)
            out_b = torch.empty(send_rows, hidden, device=DEV, dtype=dt)

            def raw(out_a=out_a, a=a, out_b=out_b, b=b, plan=plan) -> None:
                dist.all_to_all_single(out_a, a, plan.recv_splits, plan.send_splits, group=ep_group)
                dist.all_to_all_single(out_b, b, plan.send_splits, plan.recv_splits, group=ep_group)

            def ours(x=x, idx=idx, w=w) -> None:
                with torch.no_grad():
                    got, _, p = disp.dispatch(x, idx, w, n_experts)
                    disp.combine(got, p)

            if (
                PROFILE
                and hidden == SIZES["hidden"][-1]
                and tokens == SIZES["tokens"][len(SIZES["tokens"]) // 2]
            ):
                profile_once(ours, mesh.rank)
            iters = 20 if tokens * hidden < 2**26 else 10
            t_raw, t_ours = timed(raw, iters, DEV), timed(ours, iters, DEV)
            mb = (
                (send_rows + recv_rows) * hidden * a.element_size() / 2**20
            )  # both directions leave this rank
            rows.append(
                f"| {hidden} | {tokens} | {send_rows / tokens:.2f} | {mb:.1f} | {t_raw * 1e3:.3f} | "
                f"{mb / 1024 / t_raw:.0f} | {t_ours * 1e3:.3f} | {mb / 1024 / t_ours:.0f} | "
                f"{t_raw / t_ours:.0%} |"
            )


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

            def step(moe=moe, x=x) -> None:
                y = moe(x)
                y.backward(torch.ones_like(y))

            t = timed(step, 10, DEV)
            rows.append(f"| {tokens} | {ep} | {t * 1e3:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU/gloo, to check the script")
    ap.add_argument("--profile", action="store_true", help="print the profiler's top ops for one size")
    args = ap.parse_args()
    global DEV, SIZES, PROFILE
    PROFILE = args.profile
    if args.smoke:
        DEV, SIZES = "cpu", {"hidden": (64,), "tokens": (128,), "layer_tokens": (64,), "layer_hidden": 64}
    mesh = build_mesh(ep=2, device=DEV)
    disp_rows: list[str] = []
    layer_rows: list[str] = []
    bench_dispatch(mesh, disp_rows)
    bench_layer(mesh, layer_rows)
    if mesh.rank == 0:
        text = [
            f"GPUs: {torch.cuda.device_count()}x "
            f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'} | torch {torch.__version__} | "
            f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if DEV == 'cuda' else '-'}",
            "",
            "| hidden | tokens/rank | rows sent/token | MB/rank (both ways) | raw a2a ms | raw GB/s | "
            "dispatch+combine ms | ours GB/s | ours/raw |",
            "|---|---|---|---|---|---|---|---|---|",
            *disp_rows,
            "",
            "| tokens/rank | ep | MoE layer fwd+bwd ms |",
            "|---|---|---|",
            *layer_rows,
        ]
        emit(text, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Hierarchical vs flat expert dispatch: time and bytes over the slow (inter-node) and fast (intra-node) link.

Run on a multi-GPU machine (the node split is simulated with --gpus-per-node, e.g. 8 GPUs as 4 nodes × 2):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 8 bench/hierarchical_dispatch.py [--out results.md]
CPU check of the script: OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 bench/hierarchical_dispatch.py --smoke

(1) For each simulated topology (nodes × GPUs per node, ep = world) and token count, DeepSeek-V3 routing
(256 experts, top-8, 8 groups, 4 allowed per token; node-limited by the router itself) through the flat and
the hierarchical dispatcher: dispatch+combine time (no grad, and forward+backward), and the bytes each sends
per token over other nodes and inside the node, from the dispatchers' own counters (summed over ranks).
On one physical node every "inter-node" byte still rides NVLink, so times show the cost of the extra stage,
not the IB saving; the byte ratio is what carries over to real nodes.
(2) Counting only (no communication): inter-node rows per token, flat vs hierarchical, for DeepSeek-V3's
deployment shape (8 nodes × 8 GPUs, 256 experts, top-8, topk_group 4) and smaller ones, from routing alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import dispatch_combine, emit, timed  # noqa: E402
from moe_train.config import ModelConfig  # noqa: E402
from moe_train.model.moe import Router  # noqa: E402
from moe_train.parallel.dispatch import (  # noqa: E402
    AllToAllDispatcher,
    CommCounters,
    build_dispatcher,  # noqa: E402
)
from moe_train.parallel.mesh import build_mesh, check_expert_groups  # noqa: E402

DEV = "cuda"
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
SIZES = {"hidden": 7168, "tokens": (2048, 8192), "experts": 256, "k": 8, "n_group": 8, "topk_group": 4}


def router(n_experts: int, k: int, n_group: int, topk_group: int, hidden: int, seed: int) -> Router:
    """The model's own router (sigmoid, node-limited groups) with random weights: realistic routing."""
    cfg = ModelConfig(
        hidden_size=hidden,
        n_routed_experts=n_experts,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
    )
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=hidden**-0.5, generator=torch.Generator().manual_seed(seed))
    return r


def bench_topology(gpus_per_node: int, rows: list[str]) -> None:
    mesh = build_mesh(ep=int(os.environ["WORLD_SIZE"]), gpus_per_node=gpus_per_node, device=DEV)
    lay = mesh.layout
    nodes, local = lay.ep_node_shape()
    n_exp, k, hidden = SIZES["experts"], SIZES["k"], SIZES["hidden"]
    check_expert_groups(lay, n_exp, SIZES["n_group"])
    cf, ch = CommCounters(), CommCounters()
    peer_nodes = [lay.node_of(r) for r in range(lay.world)]
    flat = AllToAllDispatcher(mesh.group("ep"), lay.ep, mesh.ep_rank, cf, peer_nodes)
    hier = build_dispatcher("hierarchical", mesh, ch)
    gate = router(n_exp, k, SIZES["n_group"], SIZES["topk_group"], hidden, seed=0).to(DEV)
    for tokens in SIZES["tokens"]:
        g = torch.Generator(device=DEV).manual_seed(1000 * mesh.rank + tokens)
        x = torch.randn(tokens, hidden, device=DEV, generator=g).to(DTYPE[DEV])
        with torch.no_grad():
            routing = gate(x.float())
        idx, w = routing.topk_idx, routing.topk_weight

        def run(disp, x=x, idx=idx, w=w, grad: bool = False) -> None:
            xi = x.detach().requires_grad_(grad)
            wi = w.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y, _ = dispatch_combine(disp, xi, idx, wi, n_exp)
            if grad:
                y.backward(torch.ones_like(y))

        out = {}
        for name, disp, counters in (("flat", flat, cf), ("hier", hier, ch)):
            counters.take()
            run(disp)
            b = counters.take()
            t = torch.tensor(
                [float(b.get("dispatch_inter_node", 0)), float(b.get("dispatch_intra_node", 0))], device=DEV
            )
            dist.all_reduce(t)
            iters = 10 if DEV == "cuda" else 3
            out[name] = (
                timed(lambda d=disp: run(d), iters, DEV),
                timed(lambda d=disp: run(d, grad=True), iters, DEV),
                *(t / (tokens * lay.world * hidden * x.element_size())).tolist(),
            )
            counters.take()
        (tf, tfb, inf, intf), (th, thb, inh, inth) = out["flat"], out["hier"]
        rows.append(
            f"| {nodes}×{local} | {tokens} | {tf * 1e3:.2f} | {th * 1e3:.2f} | {tfb * 1e3:.2f} | "
            f"{thb * 1e3:.2f} | {inf:.2f} | {inh:.2f} | {f'{inh / inf:.2f}' if inf else '-'} | {intf:.2f} | "
            f"{inth:.2f} |"
        )


def count_rows(idx: torch.Tensor, per_rank: int, nodes: int, local: int, src_rank: int) -> tuple[int, int]:
    """(flat, hierarchical) rows leaving `src_rank`'s node for these tokens' top-k expert ids: flat sends
    one per remote rank of a token's experts, hierarchical one per remote node."""
    ranks = idx // per_rank
    src_node = src_rank // local
    hit_rank = torch.zeros(idx.shape[0], nodes * local, dtype=torch.bool).scatter_(1, ranks, True)
    hit_node = torch.zeros(idx.shape[0], nodes, dtype=torch.bool).scatter_(1, ranks // local, True)
    hit_rank[:, src_node * local : (src_node + 1) * local] = False
    hit_node[:, src_node] = False
    return int(hit_rank.sum()), int(hit_node.sum())


def bench_counting(rows: list[str], tokens: int) -> None:
    shapes = [  # (nodes, gpus per node, experts, top-k, n_group, topk_group)
        (8, 8, 256, 8, 8, 4),  # DeepSeek-V3 training: EP64 over 8 nodes
        (8, 8, 256, 8, 8, 2),
        (8, 1, 256, 8, 8, 4),
        (8, 1, 256, 8, 8, 2),
        (4, 2, 256, 8, 8, 2),
        (2, 8, 256, 8, 8, 4),
    ]
    for nodes, local, n_exp, k, n_group, topk_group in shapes:
        ep = nodes * local
        gate = router(n_exp, k, n_group, topk_group, 256, seed=1)
        flat_rows = hier_rows = 0
        g = torch.Generator().manual_seed(2)
        for src in range(ep):
            with torch.no_grad():
                idx = gate(torch.randn(tokens // ep, 256, generator=g)).topk_idx
            f, h = count_rows(idx, n_exp // ep, nodes, local, src)
            flat_rows += f
            hier_rows += h
        rows.append(
            f"| {nodes}×{local} | {n_exp} | {k} | {n_group} | {topk_group} | {flat_rows / tokens:.2f} | "
            f"{hier_rows / tokens:.2f} | {hier_rows / max(flat_rows, 1):.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU/gloo, to check the script")
    ap.add_argument("--gpus-per-node", type=int, nargs="*", default=None, help="topologies to simulate")
    args = ap.parse_args()
    global DEV, SIZES
    world = int(os.environ["WORLD_SIZE"])
    if args.smoke:
        DEV = "cpu"
        SIZES = {"hidden": 64, "tokens": (64,), "experts": 32, "k": 8, "n_group": 8, "topk_group": 2}
    topologies = args.gpus_per_node or [g for g in (world, world // 2, 2, 1) if g >= 1 and world % g == 0]
    topologies = sorted(set(topologies), reverse=True)
    rows: list[str] = []
    for g in topologies:
        bench_topology(g, rows)
    counting: list[str] = []
    if int(os.environ.get("RANK", "0")) == 0:
        bench_counting(counting, 4096 if args.smoke else 65536)
        text = [
            f"devices: {world}x "
            f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'} | torch {torch.__version__} | "
            f"experts {SIZES['experts']} top-{SIZES['k']}, n_group {SIZES['n_group']}, "
            f"topk_group {SIZES['topk_group']}, hidden {SIZES['hidden']}",
            "",
            "| nodes×gpus | tokens/rank | flat ms | hier ms | flat fwd+bwd ms | hier fwd+bwd ms | "
            "flat inter rows/token | hier inter rows/token | hier/flat inter | flat intra rows/token | "
            "hier intra rows/token |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Counting only (routing of the model's router with random weights; rows leaving the source node "
            "per token, one direction):",
            "",
            "| nodes×gpus | experts | top-k | n_group | topk_group | flat | hierarchical | hier/flat |",
            "|---|---|---|---|---|---|---|---|",
            *counting,
        ]
        emit(text, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The sync-free (bounded) dispatcher's one-GPU checks, on a one-rank process group.

    python bench/dispatch_v2.py                 # CUDA: NCCL group of one rank; symmetric-memory transports
    python bench/dispatch_v2.py --smoke         # CPU check of the script (gloo, small shape)

One MoE layer at the DeepSeek-V2-Lite proxy's shape (64 experts top-6, hidden 2048, expert width 1408,
8192 tokens: 2 sequences of 4096; bf16, grouped experts) with each dispatcher: `local` (one device, the
reference), `flat` (host-read split sizes), `bounded` over the all-to-all with equal splits (the CPU twin's
path) and `bounded` through symmetric memory: `peer_write` (writes into the peers' buffers, torch's CUDA
symmetric memory) and `nvshmem` (NVSHMEM's `all_to_all_vdev`, where its rendezvous takes a one-rank group);
and `direct` (slots placed in the owner's buffer) over its all-to-all twin and reading its rows in place
from symmetric memory (`direct+peer_write`, board.py). For each:
(1) outputs and input, expert and router gradients against `local`, and against `bounded` on the same
    inputs (max relative error);
(2) a profiled forward+backward: host syncs (`cudaStreamSynchronize`, `cudaDeviceSynchronize`,
    `_local_scalar_dense`, `item`, host copies) and launches (kernels and memcpys) per MoE layer; the
    symmetric-memory kernels seen in the trace (NVSHMEM's, the barrier's);
(3) capture of the layer's forward in a CUDA graph, replayed on new inputs, against eager;
(4) row movement: the layer with its experts replaced by the identity (route, dispatch, combine, forward
    and backward) minus the router alone, against copying the N·k rows (read plus write). The issue's goal:
    at most two passes over the N·k rows in forward plus backward (a dispatch writing them and a combine
    reading them, each way), taking at most 1.25× the time of two such copies. Device time, from the
    profiler (a CUDA-graphed step pays no launches), with the local dispatcher's kernels listed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median_ms  # noqa: E402
from moe_train.config import ModelConfig  # noqa: E402
from moe_train.model.dispatch import LocalDispatcher  # noqa: E402
from moe_train.model.init import init_weights  # noqa: E402
from moe_train.model.moe import MoE, MoEOptions  # noqa: E402
from moe_train.parallel.dispatch import (  # noqa: E402
    BOARDS,
    TRANSPORTS,
    AllToAllDispatcher,
    BoundedDispatcher,
    CommCounters,
    DirectDispatcher,
)
from moe_train.parallel.dispatch.symm import transport_missing  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "aten::item")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync")


def _cfg(smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(
            vocab_size=97, hidden_size=64, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=3, n_group=1, topk_group=1, n_shared_experts=0,
        )  # fmt: skip
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
        num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=0,
    )  # fmt: skip


def _layer(cfg: ModelConfig, dispatcher: object, device: str, dtype: torch.dtype) -> MoE:
    moe = MoE(cfg, 1, MoEOptions(expert_slice=(0, cfg.n_routed_experts)))
    init_weights(moe, 0, 0.02)
    moe = moe.to(device=device, dtype=dtype)
    if device == "cuda":
        moe.experts.impl = "grouped"
    moe.dispatcher = dispatcher
    return moe


def _run(moe: MoE, x: torch.Tensor, up: torch.Tensor) -> list[torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    y = moe(xi)
    (y.float() * up).sum().backward()
    grads = [p.grad for p in (moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight)]
    return [y.detach(), xi.grad, *grads]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _profile(moe: MoE, x: torch.Tensor, up: torch.Tensor, device: str) -> dict[str, object]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _run(moe, x, up)
    with profile(activities=acts) as prof:
        _run(moe, x, up)
    names = [e.name for e in prof.events()]
    syncs = {n: names.count(n) for n in SYNC_EVENTS if names.count(n)}
    launches = sum(names.count(n) for n in LAUNCH_EVENTS)
    symm = ("nvshmem", "a2a", "symmetric_memory", "barrier")
    kernels = sorted({e.name for e in prof.events() if any(w in e.name.lower() for w in symm)})
    return {"syncs": syncs, "launches": launches, "symm_kernels": [k[:60] for k in kernels[:4]]}


def _capture(moe: MoE, x: torch.Tensor) -> float | str:
    """Max relative error of the layer's forward replayed from a CUDA graph on a new input, against eager."""
    if x.device.type != "cuda":
        return "n/a (CPU)"
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            moe(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            out = moe(static)
    except Exception as e:  # noqa: BLE001 - report why capture failed, keep measuring
        return f"capture failed: {type(e).__name__}: {str(e)[:120]}"
    fresh = torch.randn_like(x)
    static.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        want = moe(fresh)
    return _rel(out, want)


def _timed(fn, iters: int, groups: int, device: str) -> tuple[float, float, list]:  # noqa: ANN001
    """fn's median wall ms, its device ms (the kernels' total over one profiled call, after a warm-up) and
    that call's kernels by device time: [(ms, count, name)]. On CPU the device ms is the wall ms."""
    from torch.profiler import ProfilerActivity, profile

    wall = median_ms(fn, iters, groups, device)
    if device != "cuda":
        return wall, wall, []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # self time: an event's device time without its children's, so nothing is counted twice
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)
    return wall, total, [(e.self_device_time_total / 1e3, e.count, e.key) for e in ranked]


class _PassRows(torch.autograd.Function):
    """(rows, gates) → rows: no pass over them, the rows' gradient straight back, and the gates a zero one, so
    that the router's backward runs as in a real layer (real experts form the gates' gradient inside their
    SwiGLU's backward, a pass they make anyway)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.gates = gates.shape, gates.dtype, gates.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        shape, dtype, device = ctx.gates
        return grad, torch.zeros(shape, dtype=dtype, device=device)


class _Identity(torch.nn.Module):
    """Experts that return their rows: the layer then moves rows and nothing else (router aside)."""

    weighs_rows = True  # the layer hands them the gates (and leaves them out of the combine)

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor, taps: object = None
    ) -> torch.Tensor:
        return _PassRows.apply(x, gates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokens = 64 if args.smoke else args.tokens
    backend = "gloo" if device == "cpu" else "nccl"
    if device == "cuda":
        torch.cuda.set_device(0)
    store = tempfile.mktemp()
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    group = dist.new_group([0])
    cfg = _cfg(args.smoke)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype, generator=g)
    up = torch.randn(1, tokens, cfg.hidden_size, device=device, generator=g)

    dispatchers: dict[str, object] = {
        "local": LocalDispatcher(),
        "flat": AllToAllDispatcher(group, 1, 0, CommCounters()),
        "bounded": BoundedDispatcher(group, 1, 0, CommCounters()),
        "direct": DirectDispatcher(group, 1, 0, CommCounters()),  # its all-to-all twin
    }
    if device == "cpu":  # the board's collective twin stands in for symmetric memory
        board = BOARDS["collective"](group, torch.device(device))
        dispatchers["direct+collective"] = DirectDispatcher(group, 1, 0, CommCounters(), transport=board)
    for name in ("peer_write", "nvshmem"):
        missing = transport_missing(name, torch.device(device))
        if name == "nvshmem" and missing is None:  # and it would switch the process's backend
            missing = "torch 2.11's NVSHMEM rendezvous refuses a one-rank group"
        if missing is not None:
            print(f"{name} transport skipped: {missing}")
            continue
        try:
            transport = TRANSPORTS[name](group, torch.device(device))
            bounded = BoundedDispatcher(group, 1, 0, CommCounters(), transport=transport)
            dispatchers[f"bounded+{name}"] = bounded
            if name in BOARDS:  # the direct dispatcher's rows read in place from symmetric memory
                board = BOARDS[name](group, torch.device(device))
                dispatchers[f"direct+{name}"] = DirectDispatcher(group, 1, 0, CommCounters(), transport=board)
        except Exception as e:  # noqa: BLE001
            print(f"{name} transport unavailable: {type(e).__name__}: {e}")

    ref = _run(_layer(cfg, dispatchers["local"], device, dtype), x, up)
    again = _run(_layer(cfg, dispatchers["local"], device, dtype), x, up)
    # run-to-run: the local dispatcher twice before any other row count reaches the compiled kernels; its
    # row below runs after the other dispatchers' shapes did
    rerun = max(_rel(a, b) for a, b in zip(again, ref, strict=True))
    print(f"local against itself, back to back: {rerun:.1e}")
    twin = _run(_layer(cfg, dispatchers["bounded"], device, dtype), x, up)
    rows = []
    for name, d in dispatchers.items():
        moe = _layer(cfg, d, device, dtype)
        try:
            got = _run(moe, x, up)
            err = max(_rel(a, b) for a, b in zip(got, ref, strict=True))
            err_twin = max(_rel(a, b) for a, b in zip(got, twin, strict=True))
            prof = _profile(moe, x, up, device)
            cap = _capture(moe, x)
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the others' numbers
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append((name, err, err_twin, prof, cap))
    print(
        "| dispatcher | rel err vs local | vs bounded (all-to-all) | host syncs (fwd+bwd) | launches "
        "| symm kernels | graph replay |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, err, err_twin, prof, cap in rows:
        cap_s = cap if isinstance(cap, str) else f"{cap:.1e}"
        syncs, launches, kernels = prof["syncs"] or 0, prof["launches"], prof["symm_kernels"]
        print(f"| {name} | {err:.1e} | {err_twin:.1e} | {syncs} | {launches} | {kernels} | {cap_s} |")

    # (4) row movement: identity experts, forward+backward, minus the router alone; against two copies of the
    # N·k rows. Device time (the kernels' sum in a profile): a captured step pays no launches, and this
    # layer's eager loop is host-bound.
    k = cfg.num_experts_per_tok
    src = torch.randn(tokens * k, cfg.hidden_size, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    iters, group_n = (3, 1) if args.smoke else (10, 5)
    copy_ms = median_ms(lambda: dst.copy_(src), iters, group_n, device)
    moe = _layer(cfg, LocalDispatcher(), device, dtype)
    xr = x.detach().requires_grad_(True)

    # both backward from given gradients: a loss's own casts and reductions would count as movement
    dw = torch.randn(tokens, k, device=device)
    dy = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)

    def router() -> None:
        moe.gate(xr.view(-1, cfg.hidden_size)).topk_weight.backward(dw)

    router_ms, router_dev, _ = _timed(router, iters, group_n, device)
    gb = 2 * src.numel() * src.element_size() / 1e9
    print(
        f"copy of N·k rows (read+write {gb:.2f} GB): {copy_ms:.3f} ms; router fwd+bwd {router_ms:.3f} ms "
        f"wall, {router_dev:.3f} ms device"
    )
    print(
        "| dispatcher | layer fwd+bwd ms (wall / device) | movement device ms (minus router) | / 2 copies |"
    )
    print("|---|---|---|---|")
    for name, d in dispatchers.items():
        layer = _layer(cfg, d, device, dtype)
        layer.experts = _Identity()

        def step(layer: MoE = layer) -> None:
            layer(xr).backward(dy)

        try:
            ms, dev_ms, kernels = _timed(step, iters, group_n, device)
        except Exception as e:  # noqa: BLE001
            print(f"| {name} | FAILED {type(e).__name__} | | |")
            continue
        moved = dev_ms - router_dev
        print(f"| {name} | {ms:.3f} / {dev_ms:.3f} | {moved:.3f} | {moved / (2 * copy_ms):.2f}× |")
        if name in ("local", "bounded+peer_write", "direct", "direct+peer_write"):
            for ms_k, count, key in kernels[:16]:
                print(f"    {ms_k:.3f} ms  x{count}  {key[:100]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

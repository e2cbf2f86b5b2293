"""Inference on one GPU: prefill and decode tokens/s, CUDA graphs, the latent cache's size, ZeRO-Inference.

Why these numbers: decode is one token per sequence per step, bound by reading the weights (and the cache)
and, in eager PyTorch, by launching the step's kernels from Python — CUDA graphs remove the second; prefill is
matrix-matrix work.  MLA exists to shrink the cache; ZeRO-Inference exists to run a model larger than the
GPU.  The model is the DeepSeek-V2-Lite-shaped proxy of bench/train_throughput.py (12 layers, no MTP), random
bf16 weights with fp32 routers (as `load_for_inference` loads them), greedy decoding from random prompts.

Sections (every number comes from `moe_train.infer.generate`, the API the CLI uses):
1. decode at each --batches, eager and with `cuda_graph=True`; graph tokens must equal eager tokens
   (asserted: same kernels, launched differently), prefill tokens/s of the same runs; with --compile also
   the graph of a copy whose phases are compiled with tuned kernels (`generate --compile`; its tokens are
   reported against eager's, not asserted: fused kernels round differently), without and with the
   direct-experts path (ops/direct_experts.py; --compiled-paths picks either or both), and their steps
   under the profiler;
2. KV-cache bytes of the latent cache (allocated, measured) against a standard MHA cache of the same heads
   (2·n_h·d_h values per token per layer, computed);
3. ZeRO-Inference with the weights in CPU memory, the GPU capped at --budget-gib by
   `torch.cuda.set_per_process_memory_fraction` below the model's size: tokens/s, and the peak allocated
   memory asserted under the budget; tokens must equal those of the GPU-resident model (asserted).

Usage (GPU machine): python bench/decode.py [--layers 12 --prompt 256 --new 64 --batches 1,64 --budget-gib 5]
Smoke test on a CPU: python bench/decode.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, median_ms  # noqa: E402
from bench.train_throughput import proxy_config  # noqa: E402
from moe_train.config import ModelConfig  # noqa: E402
from moe_train.infer import GenerationResult, generate, mha_cache_elements, mla_cache_elements  # noqa: E402
from moe_train.infer.forward import InferenceModel  # noqa: E402
from moe_train.infer.offload import OffloadConfig, nvme_unavailable_reason, offload_model  # noqa: E402
from moe_train.model import build_model, count_params  # noqa: E402
from moe_train.model.compile import compile_phases  # noqa: E402
from moe_train.model.moe import RoutedExperts, Router  # noqa: E402
from moe_train.model.transformer import Transformer  # noqa: E402
from moe_train.ops.direct_experts import direct_rows  # noqa: E402

GIB = 2**30


def bf16_model(cfg: ModelConfig, device: str) -> Transformer:
    """Random weights in bf16, routers in fp32: what `load_for_inference(dtype='bfloat16')` gives."""
    model = build_model(cfg, device=device, seed=0).eval()
    for m in model.modules():
        if not isinstance(m, Router):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    return model


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def best_of(n: int, fn: Callable[[], GenerationResult]) -> GenerationResult:
    """The run with the shortest decode time of n (all must give the same tokens; the first is kept)."""
    runs = [fn() for _ in range(n)]
    for r in runs[1:]:
        if r.tokens != runs[0].tokens:
            raise AssertionError("repeated greedy runs gave different tokens")
    return min(runs, key=lambda r: r.decode_seconds)


def differ(runs: dict[bool, GenerationResult]) -> str:
    """Where graph and eager tokens first part: rows that differ and the earliest step."""
    pairs = list(zip(runs[False].tokens, runs[True].tokens, strict=True))
    bad = [(a, b) for a, b in pairs if a != b]
    first = min(next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y) for a, b in bad)
    return f"{len(bad)} of {len(pairs)} rows, first at step {first}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_section(
    model: Transformer, args: argparse.Namespace, failures: list[str], compiled: Transformer | None
) -> list[str]:
    rows = [
        "| batch | prompt | new | decode path | prefill tokens/s | decode tokens/s | ms / step | capture s "
        "| tokens = eager |",
        "|" + " --- |" * 9,
    ]
    notes: set[str] = set()
    vocab = model.cfg.vocab_size
    read_gbps, active = hbm_read_gbps(args.device), active_bytes(model)
    bound_ms = 1e3 * active / (read_gbps * 1e9) if read_gbps == read_gbps else 0.0
    rows[:0] = [
        f"batch-1 weight-read bound: {active / 1e9:.3f} GB active per token / {read_gbps:,.0f} GB/s HBM read "
        f"(a sum over 2 GiB) = {bound_ms:.3f} ms a step",
        "",
    ]
    generate(model, prompts(1, 16, vocab, 0), 4)  # warm-up: cuBLAS handles, allocator
    for batch in args.batch_list:
        ps = prompts(batch, args.prompt, vocab, seed=batch)
        runs = {}
        for graph in (False, True):
            r = best_of(args.repeats, lambda: generate(model, ps, args.new, cuda_graph=graph))  # noqa: B023
            runs[graph] = r
        eager = runs[False]
        extra: list[tuple[GenerationResult, bool]] = []  # (run, its tokens equal eager's)
        for direct in args.compiled_paths if compiled is not None else ():
            direct_experts(compiled, direct)
            generate(compiled, ps, args.new, cuda_graph=True)  # compiles this batch's shapes
            r = best_of(args.repeats, lambda: generate(compiled, ps, args.new, cuda_graph=True))  # noqa: B023
            r.decode_path += ", compiled phases" + (", direct experts" if direct else "")
            extra.append((r, r.tokens == eager.tokens))
        same = runs[True].tokens == eager.tokens
        if not same:
            failures.append(f"batch {batch}: CUDA-graph tokens differ from eager tokens ({differ(runs)})")
        if args.device == "cuda" and runs[True].decode_path != "cuda graph":
            failures.append(f"batch {batch}: graph not captured: {runs[True].graph_fallback}")
        for r, equal in [*((r, same) for r in runs.values()), *extra]:
            steps = max(len(t) for t in r.tokens) - 1
            ms = 1e3 * r.decode_seconds / max(steps, 1)
            bound = f" ({bound_ms / ms:.0%} of the weight-read bound)" if batch == 1 and bound_ms else ""
            rows.append(
                f"| {batch} | {args.prompt} | {args.new} | {r.decode_path} | {r.prefill_tokens_per_s:,.0f} "
                f"| {r.decode_tokens_per_s:,.0f} | {ms:.2f}{bound} "
                f"| {r.capture_seconds:.2f} | {'yes' if equal else 'NO'} |"
            )
            if r.graph_fallback:
                notes.add(f"cuda_graph=True fell back to eager decoding: {r.graph_fallback}")
        print("\n".join(rows[-len(runs) - len(extra) :]), flush=True)
    return rows + ([""] if notes else []) + sorted(notes)


def direct_experts(model: Transformer, on: bool) -> None:
    """Switch a model compiled with direct experts (`compile_phases(..., direct_experts=True)`) between
    that path at decode and the grouped one."""
    for m in model.moe_layers():
        m.direct_rows = direct_rows(m.n_experts, m.gate.top_k) if on else 0


def profile_section(model: Transformer, args: argparse.Namespace, what: str = "") -> list[str]:
    """Where a batch-1 decode step's time goes: the static step (what a graph replays) run eagerly under the
    profiler, its kernels by device time, their number and mean duration. what: a label for the model."""
    from torch.profiler import ProfilerActivity, profile

    from moe_train.infer import new_cache
    from moe_train.infer.decode import DecodeStep

    im = InferenceModel(model)
    cache = new_cache(im, 1, args.prompt + 8)
    ids = torch.tensor(prompts(1, args.prompt, model.cfg.vocab_size, seed=7), device=args.device)
    im(ids, torch.arange(args.prompt, device=args.device)[None], cache, absorb=False)
    cache.lengths.fill_(args.prompt)
    step, lengths = DecodeStep(im, cache, True, args.device == "cuda"), cache.lengths.clone()
    token = torch.zeros(1, 1, dtype=torch.long, device=args.device)
    for _ in range(3):  # warm-up
        cache.lengths.copy_(lengths)
        step(token)
    n = 5
    cuda = args.device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            cache.lengths.copy_(lengths)
            step(token)
        sync(args.device)
    ev = [e for e in prof.key_averages() if (e.device_time_total if cuda else e.self_cpu_time_total) > 0]
    ev = [e for e in ev if cuda or not e.cpu_children]
    t = [(e.device_time_total if cuda else e.self_cpu_time_total) / n / 1e3 for e in ev]
    count = sum(e.count for e in ev) / n
    rows = [
        f"batch-1 decode step{what} under the profiler: {sum(t):.3f} ms busy in {count:.0f} "
        f"{'kernels' if cuda else 'CPU ops'}, {1e3 * sum(t) / max(count, 1):.1f} us each on average",
        "",
        "| ms / step | calls / step | kernel |",
        "| --- | --- | --- |",
    ]
    for ms, e in sorted(zip(t, ev, strict=True), key=lambda p: -p[0])[: args.profile_top]:
        rows.append(f"| {ms:.3f} | {e.count / n:.0f} | {e.key[:100]} |")
    return rows


def hbm_read_gbps(device: str) -> float:
    """HBM read rate, GB/s: a sum over 2 GiB of bf16 reads each byte once and writes nothing."""
    if device != "cuda":
        return float("nan")
    x = torch.ones(GIB, dtype=torch.bfloat16, device=device)
    return 2 * GIB / median_ms(x.sum, 5, 4, device) / 1e6


def active_bytes(model: Transformer) -> int:
    """Weight bytes one token reads at batch 1: everything but the routed experts and the embedding, k
    routed experts per MoE layer, and one embedding row."""
    cfg, total, routed = model.cfg, 0, 0
    for name, p in model.named_parameters():
        if ".experts." in name and "shared" not in name:
            routed += p.numel() * p.element_size()
        elif name != "embed_tokens.weight":
            total += p.numel() * p.element_size()
    emb = model.embed_tokens.weight
    per_token_routed = routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return total + per_token_routed + emb.shape[1] * emb.element_size()


def cache_section(model: Transformer, args: argparse.Namespace) -> list[str]:
    cfg = model.cfg
    batch, max_len = max(args.batch_list), args.prompt + args.new
    layers = cfg.num_hidden_layers
    sync(args.device)
    before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    cache = InferenceModel(model).new_cache(batch, max_len)
    sync(args.device)
    measured = torch.cuda.memory_allocated() - before if args.device == "cuda" else cache.nbytes()
    item = cache.dtype.itemsize
    mla, mha = mla_cache_elements(cfg), mha_cache_elements(cfg)
    tokens = batch * max_len * layers
    del cache
    return [
        f"| cache ({cache_dtype_name(item)}) | values / token / layer | bytes / token / layer "
        f"| batch {batch} × {max_len} tokens × {layers} layers |",
        "| --- | --- | --- | --- |",
        f"| MLA latent (kv_lora_rank + qk_rope_head_dim) | {mla} | {mla * item:,} "
        f"| {measured / 2**20:,.1f} MiB allocated |",
        f"| MHA, same heads (2·n_h·d_h) | {mha} | {mha * item:,} | {tokens * mha * item / 2**20:,.1f} MiB "
        f"(computed) |",
        f"| MHA / MLA | {mha / mla:.1f}× | | |",
    ]


def cache_dtype_name(itemsize: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(itemsize, f"{itemsize} B")


def h2d_gbps(device: str) -> float:
    """Pinned host-to-device copy rate, GB/s, of 1 GiB (the link the offload streams over)."""
    if device != "cuda":
        return float("nan")
    host = torch.empty(GIB // 2, dtype=torch.bfloat16).pin_memory()
    dev = torch.empty_like(host, device=device)
    return GIB / median_ms(lambda: dev.copy_(host, non_blocking=True), 3, 2, device) / 1e6


def offload_section(model: Transformer, args: argparse.Namespace, failures: list[str]) -> list[str]:
    """ZeRO-Inference under a GPU memory cap, for each --offload-experts mode: `chosen` (only the routed
    experts the router chose cross the link) and `layer` (DeepSpeed streams whole layers). Bytes per
    decode step: the non-expert weights (streamed every step) plus, for `chosen`, the experts fetched per
    decode step (counted), for `layer` all experts; their rate is a share of the pinned H2D rate measured
    in the same process."""
    link = h2d_gbps(args.device)
    rows = [
        f"pinned host-to-device copy: {link:.1f} GB/s (1 GiB copies, median of 3 pairs)",
        "",
        "| experts fetched | model GiB | GPU budget GiB | peak allocated GiB "
        f"| batch (prompt {args.offload_prompt}, new {args.offload_new}) | prefill tokens/s "
        "| decode tokens/s | ms / step | experts / decode step | GB / step | share of H2D "
        "| tokens = resident |",
        "|" + " --- |" * 12,
    ]
    vocab = model.cfg.vocab_size
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = [1, max(args.batch_list)]
    cases = {b: prompts(b, args.offload_prompt, vocab, seed=100 + b) for b in batches}
    reference = {b: generate(model, ps, args.offload_new).tokens for b, ps in cases.items()}
    model.to("cpu")
    gc.collect()
    budget = args.budget_gib * GIB
    if args.device == "cuda":
        torch.cuda.empty_cache()
        if budget >= model_bytes:
            failures.append(
                f"budget {args.budget_gib} GiB is not below the model's {model_bytes / GIB:.1f} GiB"
            )
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(budget / total)
        print(f"offload: GPU capped at {args.budget_gib} GiB of {total / GIB:.0f}", flush=True)
    for i, mode in enumerate(modes := args.offload_experts.split(",")):
        source = model if i == len(modes) - 1 else copy.deepcopy(model)  # offload converts it in place
        rows += _offload_rows(source, mode, cases, reference, args, failures, link)
        del source
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _offload_rows(
    model: Transformer,
    mode: str,
    cases: dict[int, list[list[int]]],
    reference: dict[int, list[list[int]]],
    args: argparse.Namespace,
    failures: list[str],
    link: float,
) -> list[str]:
    """One offload mode's rows (its own function: the offloaded model is freed when it returns)."""
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    experts_of = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    expert_bytes = sum(p.numel() * p.element_size() for m in experts_of for p in m.parameters())
    n_experts = sum(m.num_local for m in experts_of)
    budget = args.budget_gib * GIB
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cfg = OffloadConfig("cpu", pin_memory=args.device == "cuda", experts=mode)
    im = offload_model(model, cfg, args.device)
    print(f"offload ({mode}): conversion took {time.perf_counter() - t0:.1f}s", flush=True)
    stage = getattr(im, "expert_stage", None)
    rows = []
    for b, ps in cases.items():
        # the first run records DeepSpeed's module trace; prefetching starts with the second
        r = best_of(2, lambda: generate(im, ps, args.offload_new))  # noqa: B023
        same = r.tokens == reference[b]
        if not same:
            failures.append(f"offload ({mode}) batch {b}: tokens differ from the GPU-resident model's")
        peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
        if args.device == "cuda" and peak > budget:
            failures.append(
                f"offload ({mode}): peak {peak / GIB:.2f} GiB above the {args.budget_gib} GiB cap"
            )
        steps = max(len(t) for t in r.tokens) - 1
        ms = 1e3 * r.decode_seconds / max(steps, 1)
        experts = float(n_experts)
        if stage is not None:  # experts fetched by the decode steps alone: a run minus its prefill
            stage.fetched = 0
            generate(im, ps, 1)
            prefill, stage.fetched = stage.fetched, 0
            generate(im, ps, args.offload_new)
            experts = (stage.fetched - prefill) / max(steps, 1)
        step_gb = (model_bytes - expert_bytes + experts * expert_bytes / max(n_experts, 1)) / 1e9
        rows.append(
            f"| {mode} | {model_bytes / GIB:.1f} | {args.budget_gib:g} | {peak / GIB:.2f} | {b} "
            f"| {r.prefill_tokens_per_s:,.0f} | {r.decode_tokens_per_s:,.1f} | {ms:.0f} | {experts:.1f} "
            f"| {step_gb:.2f} | {step_gb / (ms / 1e3) / link:.0%} | {'yes' if same else 'NO'} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence (decode sections)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=2, help="runs per decode case (the fastest is reported)")
    ap.add_argument("--offload-prompt", type=int, default=64, help="prompt tokens per sequence with offload")
    ap.add_argument("--offload-new", type=int, default=8, help="new tokens per sequence with offload")
    ap.add_argument("--budget-gib", type=float, default=6.0, help="GPU memory cap for the offload section")
    ap.add_argument("--no-offload", action="store_true")
    ap.add_argument(
        "--profile-top", type=int, default=15, help="kernels listed for the decode step (0: none)"
    )
    ap.add_argument(
        "--offload-experts", default="chosen,layer", help="offload modes to run (OffloadConfig.experts)"
    )
    ap.add_argument("--compile", action="store_true", help="also decode with compiled phases")
    ap.add_argument(
        "--compiled-paths",
        default="phases,direct",
        help="with --compile: the compiled decode paths to run, of phases (grouped experts) and direct "
        "(direct experts: what `generate --compile` runs); each compiles its own kernels per batch",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (CPU smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where the table goes")
    args = ap.parse_args()
    args.batch_list = [int(b) for b in args.batches.split(",")]
    paths = args.compiled_paths.split(",")
    if not paths or any(p not in ("phases", "direct") for p in paths):
        ap.error(f"--compiled-paths={args.compiled_paths}: a comma-separated list of phases, direct")
    args.compiled_paths = [p == "direct" for p in paths]
    if args.tiny:
        args.prompt, args.new = min(args.prompt, 12), min(args.new, 6)
        args.offload_prompt, args.offload_new = min(args.offload_prompt, 8), min(args.offload_new, 4)
    os.makedirs(args.out, exist_ok=True)
    cfg = proxy_config(args.layers, args.tiny)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    counts = count_params(cfg)
    header = (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}, "
        f"torch {torch.__version__}; {'tiny ' if args.tiny else ''}V2-Lite proxy, {args.layers} layers, "
        f"{counts.total / 1e9:.2f}B parameters ({counts.active / 1e9:.2f}B active), bf16 weights, "
        "fp32 routers, greedy"
    )
    print(header, flush=True)
    failures: list[str] = []
    t0 = time.perf_counter()
    model = bf16_model(cfg, args.device)
    print(f"model built in {time.perf_counter() - t0:.1f}s", flush=True)
    compiled = None
    if args.compile:
        compiled = copy.deepcopy(model)
        compile_phases(compiled, direct_experts=True, tuned=True)  # as generate --compile does
    decode_rows = decode_section(model, args, failures, compiled)
    parts = [header, "", *decode_rows, "", *cache_section(model, args)]
    if args.profile_top:
        runs = [(model, False, "")]
        if compiled is not None:
            runs += [(compiled, False, " (compiled phases)"), (compiled, True, " (compiled, direct experts)")]
        for m, direct, what in runs:
            if m is compiled:
                direct_experts(m, direct)
            parts += ["", *profile_section(m, args, what)]
            print("\n".join(parts[-args.profile_top - 4 :]), flush=True)
    if compiled is not None:  # Dynamo's caches hold the compiled copy: free it before the capped sections
        del compiled
        torch._dynamo.reset()
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "decode.md"), "w", encoding="utf-8") as f:  # kept if offload fails
        f.write("\n".join(parts) + "\n")
    if not args.no_offload:
        nvme = nvme_unavailable_reason()
        parts += ["", f"NVMe offload here: {'available' if nvme is None else 'unavailable: ' + nvme}", ""]
        parts += offload_section(model, args, failures)
    parts += ["", "checks: " + ("all passed" if not failures else "; ".join(failures))]
    print("", flush=True)
    emit(parts, os.path.join(args.out, "decode.md"))
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

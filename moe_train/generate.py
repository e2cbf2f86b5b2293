"""Generate text from a trained model: python -m moe_train.generate CHECKPOINT --prompt "...".

CHECKPOINT is one of ours (a run dir, its checkpoints dir or a step_N dir) or a Hugging Face DeepSeek-V3
directory (config.json + safetensors).  Tokens stream to stdout as they are produced; the prefill and decode
rates go to stderr, separately, because they measure different things (matrix-matrix prefill vs the
memory-bound decode over the latent cache).  See docs/inference.md.

--cuda-graph replays the decode step from a CUDA graph (falling back to eager decoding with a one-line
reason where it cannot); --offload cpu|nvme keeps the weights off the GPU and streams them per layer
through DeepSpeed ZeRO-Inference, for models larger than the GPU; under `torchrun --nproc-per-node W` it
spreads the weights over the W processes, each fetching its part over its own link, and each decodes every
W-th prompt. --tp T --ep E splits the model over T·E processes started by `torchrun --nproc-per-node T·E`
(parallel/tensor.py). Under torchrun rank 0 prints.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from typing import TextIO

import torch
import torch.distributed as dist

from .infer import SamplingConfig, generate, load_for_inference
from .infer.engine import GenerationResult, GraphFallbackWarning
from .infer.offload import EXPERT_FETCH, OFFLOAD_DEVICES, OffloadConfig
from .model.compile import compile_phases
from .parallel.tensor import join_decode_group, load_for_decode


class TextStream:
    """Writes each prompt's continuation as it grows, holding back an incomplete UTF-8 / merge tail.

    Decoding the whole continuation each time (not token by token) is what makes byte tokens and
    sub-word merges print correctly; the held-back tail is the text that may still change.
    """

    def __init__(self, decode, out: TextIO, rows: int) -> None:
        self.decode, self.out = decode, out
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.printed = [0] * rows

    def __call__(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        if len(self.tokens) == 1:
            self.flush(0, final=False)

    def flush(self, row: int, final: bool) -> None:
        text = self.decode(self.tokens[row])
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > self.printed[row]:
            self.out.write(text[self.printed[row] :])
            self.out.flush()
            self.printed[row] = len(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_train.generate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run dir, checkpoints dir, step_N dir, or Hugging Face directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--no-eod-stop", action="store_true", help="do not stop at the tokenizer's end token")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the checkpoint's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--plain", action="store_true", help="decode through the plain (non-absorbed) path")
    p.add_argument("--cuda-graph", action="store_true", help="replay the decode step from a CUDA graph")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each block's phases: fuses a step's norms, router and elementwise work, "
        "and a decode step's routed experts read straight from the chosen experts' weights (the first "
        "steps of each batch shape compile); one CUDA process, weights resident",
    )
    p.add_argument(
        "--offload", choices=OFFLOAD_DEVICES, default=None, help="ZeRO-Inference: weights in CPU RAM / NVMe"
    )
    p.add_argument("--nvme-path", default=None, help="directory on the NVMe drive (--offload nvme)")
    p.add_argument("--prefetch-layers", type=int, default=1, help="layers fetched ahead (--offload)")
    p.add_argument(
        "--offload-experts",
        choices=EXPERT_FETCH,
        default="auto",
        help="--offload: copy only the routed experts chosen (chosen; auto for cpu) or whole layers (layer)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (tp × ep processes, by torchrun)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (tp × ep processes, by torchrun)")
    return p.parse_args(argv)


def report(result: GenerationResult, err: TextIO) -> None:
    if result.graph_fallback is not None:
        err.write(f"cuda graph: not used, decoding eagerly: {result.graph_fallback}\n")
    err.write(
        f"prefill: {result.prefill_tokens} tokens in {result.prefill_seconds:.3f}s "
        f"({result.prefill_tokens_per_s:.1f} tokens/s); decode: {result.decode_tokens} tokens in "
        f"{result.decode_seconds:.3f}s ({result.decode_tokens_per_s:.1f} tokens/s, {result.decode_path})\n"
    )


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> GenerationResult:
    args = parse_args(argv)
    out, err = out or sys.stdout, err or sys.stderr
    world, ranks = int(os.environ.get("WORLD_SIZE", "1")), args.tp * args.ep
    spread = bool(args.offload) and ranks == 1 and world > 1  # offloaded weights spread over the processes
    if ranks != world and not spread:
        raise SystemExit(
            f"--tp={args.tp} --ep={args.ep} needs {ranks} processes: launch with torchrun --nproc-per-node "
            f"{ranks} (this is one of {world})"
        )
    if args.compile and (ranks > 1 or args.offload or not args.device.startswith("cuda")):
        raise SystemExit(
            "--compile works with --device cuda, --tp 1 --ep 1 and without --offload (the compiled phases "
            "decode at the fixed shapes of the CUDA step)"
        )
    if ranks > 1 and args.offload:
        raise SystemExit("--offload works with --tp 1 --ep 1 only")
    if world > 1:
        args.device = join_decode_group(args.device)
        if dist.get_rank() != 0:  # one rank prints
            out, err = io.StringIO(), io.StringIO()
    offload = None
    if args.offload:
        try:
            offload = OffloadConfig(
                args.offload, args.nvme_path, args.prefetch_layers, experts=args.offload_experts
            )
        except ValueError as e:
            raise SystemExit(str(e)) from None
    elif args.nvme_path:
        raise SystemExit("--nvme-path is for --offload nvme")
    elif args.offload_experts != "auto":
        raise SystemExit("--offload-experts is for --offload")
    if ranks > 1:  # cut first: each rank reads only the parts of the tensors it keeps
        loaded = load_for_decode(args.checkpoint, args.ep, args.device, args.dtype, args.tokenizer)
    else:
        loaded = load_for_inference(args.checkpoint, args.device, args.dtype, args.tokenizer, offload)
    tok = loaded.tokenizer
    if tok is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer.json: pass --tokenizer tokenizer.json")
    model = loaded.model
    if args.compile:
        compile_phases(model, direct_experts=True, tuned=True)
    where = f", weights offloaded to {args.offload}" if args.offload else ""
    where += f", over {ranks} ranks (tp={args.tp}, ep={args.ep})" if ranks > 1 else ""
    where += f", spread over {world} ranks, each decoding every {world}th prompt" if spread else ""
    err.write(f"loaded {loaded.source} (MTP layers are not used for generation{where})\n")
    prompts = [tok.encode(p) for p in args.prompt]
    # spread: this rank's prompts; a rank with none decodes the first prompt's first token, unprinted: every
    # rank's steps are collectives
    mine = list(range(dist.get_rank(), len(prompts), world)) if spread else list(range(len(prompts)))
    run_prompts = [prompts[i] for i in mine] or [prompts[0][:1]]
    stops = list(args.stop) + ([] if args.no_eod_stop else [tok.eod_id])
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    # one prompt streams as its tokens come; a batch prints at the end (rows would interleave)
    single = len(prompts) == 1
    stream = TextStream(tok.decode, out, len(prompts))
    if single:
        out.write(args.prompt[0])
    with warnings.catch_warnings():  # report() prints the reason as one line
        warnings.simplefilter("ignore", GraphFallbackWarning)
        result = generate(
            model,
            run_prompts,
            args.max_new_tokens,
            sampling,
            stops,
            absorb=not args.plain,
            on_token=stream if single else None,
            cuda_graph=args.cuda_graph,
        )
    if single:
        stream.flush(0, final=True)
        out.write("\n")
    else:  # each prompt with its continuation
        tokens = dict(zip(mine, result.tokens, strict=False))
        if spread:  # every rank's continuations, for rank 0 to print in the prompts' order
            parts: list[dict[int, list[int]]] = [{} for _ in range(world)]
            dist.all_gather_object(parts, tokens)
            tokens = {i: t for part in parts for i, t in part.items()}
        stream.tokens = [tokens[i] for i in range(len(prompts))]
        for row, prompt in enumerate(args.prompt):
            out.write(f"--- [{row}] {prompt}")
            stream.flush(row, final=True)
            out.write("\n")
    report(result, err)
    return result


if __name__ == "__main__":
    main()

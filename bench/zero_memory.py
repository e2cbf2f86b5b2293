"""Peak GPU memory and step time of the trainer's optimizer engines: torch AdamW vs DeepSpeed ZeRO-1 vs ZeRO-1
with the optimizer on the host (`deepspeed.offload_optimizer=cpu`).

Why: optimizer state is the largest memory term of MoE training (fp32 weights 4 B, gradients 4 B, Adam moments
8 B a parameter under the torch engine); ZeRO-1 shards the moments and its fp32 master copy over dp, offload
moves them off the GPU. The point of the table is what that buys per rank, and what it costs per step, for
the real trainer (our forward/backward, our reduction groups), not a toy.

One torchrun per engine (each builds the same DeepSeek-V2-Lite-shaped model, data-parallel over the GPUs):
  torchrun --nproc-per-node 2 bench/zero_memory.py --engine torch   [--layers 6] [--out FILE]
  torchrun --nproc-per-node 2 bench/zero_memory.py --engine zero1
  torchrun --nproc-per-node 2 bench/zero_memory.py --engine zero1_offload
Each prints one table row (rank 0); --out appends it to FILE.
CPU smoke test: torchrun --nproc-per-node 2 bench/zero_memory.py --engine zero1 --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import print_row, shared_run_dir, trainer_steps  # noqa: E402

ENGINES = {
    "torch": ["optim.engine=torch"],
    "zero1": ["optim.engine=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["optim.engine=deepspeed", "deepspeed.zero_stage=2"],
    "zero1_offload": ["optim.engine=deepspeed", "deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu"],
}


def overrides(args: argparse.Namespace, world: int) -> list[str]:
    if args.tiny:
        model = ["model=tiny", "data.seq_len=64", f"data.batch_size={2 * world}"]
    else:
        model = [
            "model=deepseek_v2_lite",
            f"model.num_hidden_layers={args.layers}",
            "model.max_position_embeddings=8192",
            f"data.seq_len={args.seq}",
            f"data.batch_size={args.batch * world}",
            "data.synthetic_vocab=102400",
        ]
    return [
        "data=synthetic",
        "data.synthetic_tokens=2000000",
        *model,
        f"trainer.max_steps={args.steps}",
        "trainer.resume=none",
        "trainer.progress=false",
        "logger.console=false",
        "trainer.log_expert_load=false",
        *ENGINES[args.engine],
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=sorted(ENGINES), required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    t, times, records = trainer_steps(overrides(args, world), args.steps, shared_run_dir("zero_memory"))
    rec = records[-1]
    cuda = t.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if t.zero is not None:
        b = t.zero.state_bytes()
        opt_gib = sum(b.values()) / 2**30
    else:
        opt_gib = (
            sum(
                v.numel() * v.element_size()
                for st in t.optimizer.state.values()
                for v in st.values()
                if torch.is_tensor(v) and v.ndim > 0
            )
            / 2**30
        )
    peak_t = torch.tensor([peak], device=t.device)
    if t.mesh.distributed:
        torch.distributed.all_reduce(peak_t, op=torch.distributed.ReduceOp.MAX)
    step_s = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    if t.mesh.is_logging_rank:
        row = (
            f"| {args.engine} | {t.params.total / 1e9:.2f} | {world} | {opt_gib:.1f} | {float(peak_t):.1f} "
            f"| {step_s * 1000:.0f} | {rec['loss']:.4f} |"
        )
        head = "| engine | params (B) | GPUs (dp) | optimizer state / rank GiB | peak alloc GiB (max rank) "
        print_row(head + "| step ms (median) | loss at last step |", row, args.out)


if __name__ == "__main__":
    main()

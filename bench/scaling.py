"""Weak scaling of the whole trainer: tokens/s and MFU at a fixed per-GPU batch as GPUs (and layouts) grow.

Why: the per-GPU work stays fixed, so a perfect framework keeps tokens/s per GPU flat from 1 to N GPUs; what
it loses is the price of its communication (gradient all-reduce, expert all-to-all, pipeline bubbles) not
hidden under compute. It runs `Trainer.train_step` — forward, backward, reduction, clipping, update — so every
part of a real step is in the number.

One torchrun per layout; each prints one table row (rank 0) and appends it to --out:
  torchrun --nproc-per-node 1 bench/scaling.py
  torchrun --nproc-per-node 2 bench/scaling.py                    # dp=2
  torchrun --nproc-per-node 2 bench/scaling.py --ep 2             # dp=2, experts over 2 GPUs
  torchrun --nproc-per-node 4 bench/scaling.py --pp 2 --ep 2 --schedule dualpipev
  torchrun --nproc-per-node 8 bench/scaling.py --pp 4 --ep 2 --schedule dualpipe
Extra trainer overrides go after `--`, e.g. `-- parallel.dispatcher=hierarchical parallel.gpus_per_node=1`.
CPU smoke test: torchrun --nproc-per-node 2 bench/scaling.py --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import print_row, shared_run_dir, trainer_steps  # noqa: E402

HEADER = (
    "| GPUs | layout | tokens/step | step ms | tokens/s | tokens/s per GPU | MFU (989) "
    "| a2a MB/step to other ranks (to other nodes) |\n|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("extra", nargs="*", help="trainer overrides")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // args.pp
    micro = max(2 * args.pp, 1) if args.schedule != "1f1b" or args.pp > 1 else 1
    # `batch` sequences per data-parallel rank; with pp > 1 a GPU holds 1/pp of the layers, so compare
    # tokens/s per GPU only between layouts of the same pp
    batch = args.batch * dp
    if args.tiny:
        model = ["model=tiny", "data.seq_len=64"]
    else:
        model = [
            "model=deepseek_v2_lite",
            f"model.num_hidden_layers={args.layers}",
            "model.max_position_embeddings=8192",
            f"data.seq_len={args.seq}",
            "data.synthetic_vocab=102400",
        ]
    overrides = [
        "data=synthetic",
        "data.synthetic_tokens=4000000",
        *model,
        f"data.batch_size={max(batch, dp * micro)}",
        f"parallel.pp={args.pp}",
        f"parallel.ep={args.ep}",
        f"parallel.schedule={args.schedule}",
        f"parallel.microbatches={micro}",
        f"trainer.max_steps={args.steps}",
        "trainer.resume=none",
        "trainer.progress=false",
        "logger.console=false",
        "trainer.log_expert_load=false",
        "trainer.peak_tflops=989",
        *args.extra,
    ]
    t, times, records = trainer_steps(overrides, args.steps, shared_run_dir("scaling"))
    cfg = t.cfg
    a2a = [sum(r.get(f"a2a_{k}_remote_bytes", 0) for k in ("dispatch", "combine")) for r in records]
    inter = [sum(r.get(f"a2a_{k}_inter_node_bytes", 0) for k in ("dispatch", "combine")) for r in records]
    step = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    tokens = cfg.data.batch_size * cfg.data.seq_len
    tps = tokens / step
    mfu = tps * t.flops_per_token / (989e12 * world)
    if t.mesh.is_logging_rank:
        layout = " ".join([f"pp={args.pp} dp={dp} ep={args.ep} {args.schedule}", *args.extra])
        row = (
            f"| {world} | {layout} | {tokens} | {step * 1000:.0f} | {tps:,.0f} | {tps / world:,.0f} "
            f"| {mfu:.1%} | {statistics.mean(a2a) / 2**20:.1f} ({statistics.mean(inter) / 2**20:.1f}) |"
        )
        print_row(HEADER, row, args.out)


if __name__ == "__main__":
    main()

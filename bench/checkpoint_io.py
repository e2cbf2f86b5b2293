"""Sharded checkpoint size, save time and resume time of the real trainer, per model preset.

Why: a checkpoint's cost is what decides how often a long run can afford one. This times `Trainer.save()`
after one training step (model + Adam moments, every rank writing its own shards) and a fresh trainer's
build + `trainer.resume=<that checkpoint>`, and reports the directory's size on disk.

  python bench/checkpoint_io.py [--presets tiny,small]               # one process (CPU or one GPU)
  torchrun --nproc-per-node 2 bench/checkpoint_io.py --presets small  # every rank writes its shards
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import load_cfg, print_row, shared_run_dir, trainer_steps  # noqa: E402
from moe_train.model import count_params  # noqa: E402
from moe_train.train.trainer import Trainer  # noqa: E402

HEADER = "| preset | parameters (+ MTP) | checkpoint size | save | build + resume |\n|---|---|---|---|---|"


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--out")
    args = ap.parse_args()
    for i, preset in enumerate(args.presets.split(",")):
        common = [
            f"model={preset}",
            "data=synthetic",
            "data.synthetic_tokens=50000",
            "data.seq_len=64",
            "data.batch_size=4",
            "trainer.max_steps=1",
            "logger.console=false",
            "trainer.progress=false",
        ]
        run_dir = shared_run_dir(f"ckpt_io_{preset}")
        t, _, _ = trainer_steps([*common, "trainer.resume=none"], 1, run_dir)
        t.step = 1
        t0 = time.perf_counter()
        path = t.save()
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        Trainer(load_cfg([*common, f"trainer.resume={path}"]), run_dir + "_resumed")
        resume_s = time.perf_counter() - t0
        if t.mesh.is_logging_rank:
            p = count_params(t.cfg.model)
            row = (
                f"| {preset} | {p.total / 1e6:.1f}M (+{p.mtp_total / 1e6:.1f}M) "
                f"| {dir_bytes(path) / 2**20:.1f} MiB | {save_s:.2f} s | {resume_s:.2f} s |"
            )
            print_row(HEADER if i == 0 else None, row, args.out)


if __name__ == "__main__":
    main()

"""How far an ep=2 layout's first step lands from one process's, over seeds (CPU, gloo, 2 processes).

    python bench/layout_seeds.py --seeds 0 1 2 3 --precision fp8 --dispatchers alltoall direct

A dispatcher may name its transport after a `+` (`direct+collective`: the direct dispatcher's board path,
through its CPU twin).

For each seed: the one-process run and, in a 2-process world, ep=2 with each dispatcher, through the trainer
(tests/test_layout_invariance.py's `run_layout`, the layout tests' tiny model); prints the relative
difference of step 1's gradient norm and loss. The layout tests compare these at one seed; this shows how
that seed's difference sits among others' (a token near a routing tie moves to another expert when a
layout rounds differently). `--precision fp8` uses the FP8 layout tests' model (128-wide experts).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from test_layout_invariance import run_layout  # noqa: E402

from distributed import run_world  # noqa: E402

PRECISION = {
    "fp8": ("trainer.dtype=fp8", "model.moe_intermediate_size=128"),
    "bf16_master": ("trainer.dtype=bf16_master",),
    "fp32": ("trainer.dtype=fp32",),
}


def _layouts(base: str, layouts: list[tuple[str, ...]]) -> list[dict]:
    return [run_layout(f"{base}/{i}", layout) for i, layout in enumerate(layouts)]


def _dispatcher(spec: str) -> tuple[str, ...]:
    """`name` or `name+transport` as overrides."""
    name, _, transport = spec.partition("+")
    moved = (f"parallel.dispatch_transport={transport}",) if transport else ()
    return (f"parallel.dispatcher={name}", *moved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--precision", choices=sorted(PRECISION), default="fp8")
    ap.add_argument("--dispatchers", nargs="+", default=["alltoall", "direct"])
    a = ap.parse_args()
    print(f"precision {a.precision}; rel. difference of step 1 from one process")
    print("| seed | dispatcher | grad norm | loss |\n|---:|---|---:|---:|")
    for seed in a.seeds:
        base = (*PRECISION[a.precision], f"trainer.seed={seed}")
        out = tempfile.mkdtemp(prefix="layout_seeds_")
        want = run_layout(f"{out}/one", base)["records"][0]
        layouts = [(*base, "parallel.ep=2", *_dispatcher(d)) for d in a.dispatchers]
        for name, got in zip(a.dispatchers, run_world(2, _layouts, f"{out}/ep2", layouts)[0], strict=True):
            r = got["records"][0]
            norm = abs(r["grad_norm"] - want["grad_norm"]) / want["grad_norm"]
            loss = abs(r["loss"] - want["loss"]) / want["loss"]
            print(f"| {seed} | {name} | {norm:.2e} | {loss:.2e} |", flush=True)


if __name__ == "__main__":
    main()

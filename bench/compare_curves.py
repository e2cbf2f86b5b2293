"""Validation curves of several runs in one picture, and their final validation losses side by side.

Reads every `numerics_<name>.jsonl` (or any metrics.jsonl given by path), prints the last `val_loss` of each
and, for runs named `<precision>_<seed>`, each precision's mean with its seed-to-seed spread and the relative
difference of the first precision's mean from the others'. Writes the curves to --png.

Usage: python bench/compare_curves.py DIR_OR_FILES... [--png docs/img/numerics.png]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_train.report import read_metrics  # noqa: E402


def curves(paths: list[str]) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for p in paths:
        name = os.path.basename(p).removeprefix("numerics_").removesuffix(".jsonl")
        rows = [(r["step"], r["val_loss"]) for r in read_metrics(p) if r.get("kind") == "eval"]
        if rows:
            out[name] = sorted(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    paths = []
    for p in a.inputs:
        paths += sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
    runs = curves(paths)
    print("| run | final step | final val loss |")
    print("|---|---:|---:|")
    for name, rows in runs.items():
        print(f"| {name} | {rows[-1][0]} | {rows[-1][1]:.4f} |")
    by: dict[str, list[float]] = {}
    for name, rows in runs.items():
        by.setdefault(name.rsplit("_", 1)[0], []).append(rows[-1][1])
    means = {k: statistics.mean(v) for k, v in by.items()}
    for k, v in by.items():
        print(f"{k}: mean {means[k]:.4f}, seed spread (max − min) {max(v) - min(v):.4f} over {len(v)} seeds")
    first = next(iter(means), None)
    for k in means:
        if k != first:
            print(f"{first} against {k}: {(means[first] - means[k]) / means[k]:+.2%}")
    if a.png:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name, rows in runs.items():
            ax.plot([s for s, _ in rows], [v for _, v in rows], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()

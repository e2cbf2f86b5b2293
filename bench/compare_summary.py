"""The table that closes `bench/compare_commits.sh`: per command, each round's figure for the new and the old
checkout and the ratio of their medians (new/old, higher is better; decode's ms/step inverted to match).

Usage: python bench/compare_summary.py RUNS_DIR
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys


def tokens_per_s(metrics: str, skip: int) -> float | None:
    rows = [json.loads(line) for line in open(metrics) if '"train"' in line]
    rows = [r["tokens_per_s"] for r in rows if r["step"] > skip]
    return statistics.median(rows) if rows else None


def decode_ms(table: str) -> dict[str, float]:
    """{'1 eager': ms/step, ...} from one decode.md (batch, prompt, new, mode, ..., ms/step, ...)."""
    out = {}
    for line in open(table):
        m = re.match(r"\| (\d+) \| \d+ \| \d+ \| ([^|]+?) \| [^|]+ \| [^|]+ \| ([\d.]+) \|", line)
        if m:
            out[f"decode batch {m[1]}, {m[2]}, ms/step"] = float(m[3])
    return out


def main(runs: str) -> None:
    got: dict[str, dict[str, list[float]]] = {}

    def add(what: str, tag: str, value: float | None) -> None:
        if value is not None:
            got.setdefault(what, {"new": [], "old": []})[tag].append(value)

    for table in sorted(glob.glob(os.path.join(runs, "dec_*_*", "*.md"))):
        tag = os.path.basename(os.path.dirname(table)).split("_")[1]
        for what, ms in decode_ms(table).items():
            add(what, tag, ms)
    for name, skip in (("small", 20), ("proxy", 5)):
        for d in sorted(glob.glob(os.path.join(runs, f"{name}_*"))):
            m = os.path.join(d, "metrics.jsonl")
            if os.path.isdir(d) and os.path.exists(m):
                tag = os.path.basename(d)[len(name) + 1 :].rstrip("0123456789")
                add(f"train.py {name}, tokens/s", tag, tokens_per_s(m, skip))
    print("| what | new | old | new/old (medians) |\n|---|---|---|---|")
    for what, v in got.items():
        if v["new"] and v["old"]:
            ratio = statistics.median(v["new"]) / statistics.median(v["old"])
            if "ms/step" in what:
                ratio = 1 / ratio
            new, old = (", ".join(f"{x:,.2f}" for x in v[t]) for t in ("new", "old"))
            print(f"| {what} | {new} | {old} | {ratio:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])

"""Picture of flat vs hierarchical dispatch of one token, for docs/parallelism.md.

Usage::

    python -m moe_train.parallel.draw_dispatch --out docs/img/hierarchical_dispatch.png

The arrows are derived from the same rules the dispatchers follow (flat: one copy per expert-owning rank;
hierarchical stage 1: one copy per destination node, to the rank with the sender's local index; stage 2:
from there to the owners on that node), for a token whose top-k experts sit on given ranks, so the picture
cannot drift from the rule it illustrates.  matplotlib is imported inside :func:`draw` (Agg canvas, no
pyplot), as in the pipeline drawings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

_IB, _NVL, _LOCAL = "#d1495b", "#2e86ab", "#7a7a7a"


def flat_arrows(src: int, owners: Sequence[int], local: int) -> list[tuple[int, int, str]]:
    """(from, to, link) per copy of the token: one per owning rank other than the source."""
    return [(src, r, "ib" if r // local != src // local else "nvl") for r in sorted(set(owners)) if r != src]


def hierarchical_arrows(src: int, owners: Sequence[int], local: int) -> list[tuple[int, int, str]]:
    """Stage 1 (inter-node, once per destination node) then stage 2 (inside the node, to the owners)."""
    out: list[tuple[int, int, str]] = []
    for node in sorted({r // local for r in owners}):
        fwd = node * local + src % local
        if node != src // local:
            out.append((src, fwd, "ib"))
        out += [(fwd, r, "nvl") for r in sorted(set(owners)) if r // local == node and r != fwd]
    return out


def draw(out: str, nodes: int = 2, local: int = 4, src: int = 1, owners: Sequence[int] = (3, 4, 6, 7)) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (
        ("flat all-to-all: one copy per expert rank", flat_arrows(src, owners, local)),
        (
            "hierarchical: ① once per node over IB, ② forward over NVLink",
            hierarchical_arrows(src, owners, local),
        ),
    )

    def pos(rank: int) -> tuple[float, float]:
        node, i = divmod(rank, local)
        return 1.0 + i * 1.3, 1.0 + (nodes - 1 - node) * 2.4

    for panel, (ax, (title, arrows)) in enumerate(zip(axes, panels, strict=True)):
        ax.set_xlim(0, 1.0 + local * 1.3 + 0.6)
        ax.set_ylim(0, nodes * 2.4 + 0.4)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title, fontsize=10)
        for n in range(nodes):
            y = pos(n * local)[1]
            ax.add_patch(
                FancyBboxPatch(
                    (0.35, y - 0.65),
                    local * 1.3 - 0.05,
                    1.3,
                    boxstyle="round,pad=0.05",
                    fc="#f3f3f3",
                    ec="#999",
                )
            )
            ax.text(0.2, y, f"node {n}", rotation=90, va="center", ha="center", fontsize=9)
        for r in range(nodes * local):
            x, y = pos(r)
            colour = "#ffd166" if r == src else ("#9ad0a6" if r in owners else "white")
            ax.add_patch(
                FancyBboxPatch((x - 0.4, y - 0.35), 0.8, 0.7, boxstyle="round,pad=0.02", fc=colour, ec="k")
            )
            ax.text(x, y, f"GPU {r % local}", ha="center", va="center", fontsize=8)
        crossings = 0
        for a, b, link in arrows:
            crossings += link == "ib"
            (xa, ya), (xb, yb) = pos(a), pos(b)
            rad = 0.0 if ya != yb else (-0.45 if xb > xa else 0.45)  # same node: arc above the boxes
            if panel == 1:  # stage numbers next to the hierarchical arrows
                lx, ly = (xa + xb) / 2, (ya + yb) / 2 + (0.0 if ya != yb else 0.25 * abs(xb - xa) + 0.1)
                ax.text(lx + 0.12, ly, "①" if link == "ib" else "②", fontsize=10, va="center")
            ax.add_patch(
                FancyArrowPatch(
                    (xa, ya),
                    (xb, yb),
                    connectionstyle=f"arc3,rad={rad}",
                    arrowstyle="-|>",
                    mutation_scale=14,
                    lw=2.2 if link == "ib" else 1.6,
                    color=_IB if link == "ib" else _NVL,
                    shrinkA=14,
                    shrinkB=14,
                )
            )
        ax.text(
            0.35, 0.05, f"copies over IB: {crossings}   over NVLink: {len(arrows) - crossings}", fontsize=9
        )
    fig.legend(
        handles=[
            FancyArrowPatch((0, 0), (1, 0), color=_IB, label="inter-node (IB)"),
            FancyArrowPatch((0, 0), (1, 0), color=_NVL, label="intra-node (NVLink)"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize=9,
        title="yellow: the token's GPU, green: GPUs holding its experts; combine runs the arrows backwards, "
        "summing on each node before IB",
        title_fontsize=9,
    )
    fig.savefig(out, dpi=110)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img/hierarchical_dispatch.png")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=4)
    args = ap.parse_args(argv)
    print(draw(args.out, args.nodes, args.gpus_per_node), file=sys.stdout)


if __name__ == "__main__":
    main()

"""Timeline pictures of pipeline schedules, drawn from the same action lists the executor runs.

Usage::

    python -m moe_train.parallel.pipeline.draw --schedule dualpipe --pp 8 --microbatches 20 --out dp.png

One row per rank; each action is a box placed where :func:`.analysis.simulate` puts it for the given
durations, labelled with its micro-batch.  The stages the schedule names as its second leg
(``Schedule.second_leg``: DualPipe's ``up`` pipeline, DualPipeV's way back) are drawn in a lighter shade;
an FB is one box with its forward and backward halves side by side under a common black border, as in the
DeepSeek-V3 figure.  matplotlib is imported inside
:func:`draw_schedule` (Agg canvas, no pyplot) so importing the pipeline package stays cheap and a
notebook's backend is left alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moe_train.parallel.pipeline.analysis import Durations, bubble, simulate, validate
from moe_train.parallel.pipeline.schedules import SCHEDULES, Action, Kind, Schedule, build_schedule

# (first leg, second leg) colours per part kind
_COLOURS = {
    Kind.F: ("#4878cf", "#a9c4ee"),
    Kind.B: ("#3a9a4a", "#9fd8a8"),
    Kind.W: ("#8e6bb8", "#cdb9e3"),
    Kind.BW: ("#d9822b", "#f4c28f"),
}
_NAMES = {Kind.F: "F forward", Kind.B: "B input grad", Kind.W: "W weight grad", Kind.BW: "BW full backward"}


def _parts_with_widths(action: Action, d: Durations, length: float) -> list[tuple[Action, float]]:
    """Split an FB's box between its halves in proportion to their stand-alone durations."""
    parts = action.parts()
    if len(parts) == 1:
        return [(parts[0], length)]
    raw = [d.of(p) for p in parts]
    return [(p, length * x / sum(raw)) for p, x in zip(parts, raw, strict=True)]


def draw_schedule(schedule: Schedule, out: str, durations: Durations | None = None, dpi: int = 110) -> str:
    """Write the timeline of ``schedule`` to the PNG file ``out``; returns ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    d = durations or Durations()
    timeline = simulate(schedule, d)
    span = timeline.makespan
    fig = Figure(figsize=(max(6.0, 0.3 * span + 1.5), 0.55 * schedule.pp + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for spans in timeline.spans:
        for span in spans:
            y = span.rank
            x = span.start
            for part, width in _parts_with_widths(span.action, d, span.end - span.start):
                shade = _COLOURS[part.kind][part.stage in schedule.second_leg]
                ax.add_patch(Rectangle((x, y - 0.4), width, 0.8, facecolor=shade, edgecolor="white", lw=0.6))
                ax.text(x + width / 2, y, str(part.mb), ha="center", va="center", fontsize=7)
                x += width
            if span.action.kind is Kind.FB:
                ax.add_patch(
                    Rectangle(
                        (span.start, y - 0.4), span.end - span.start, 0.8, fill=False, ec="black", lw=1.2
                    )
                )
    ax.set_xlim(0, span)
    ax.set_ylim(schedule.pp - 0.5, -0.5)
    ax.set_yticks(range(schedule.pp))
    ax.set_yticklabels([f"rank {r}" for r in range(schedule.pp)])
    has_fb = any(a.kind is Kind.FB for acts in schedule.ranks for a in acts)
    pair = f", F&B = {d.pair:g}" if has_fb else ""
    ax.set_xlabel(f"time (F = {d.f:g}, B = {d.b:g}, W = {d.w:g}{pair}; B is the input-gradient part)")
    try:
        formula = f", formula {schedule.paper_bubble(d):g}"
    except ValueError:
        formula = ""
    ax.set_title(
        f"{schedule.name}  pp={schedule.pp}  micro-batches={schedule.microbatches}  "
        f"stages={schedule.n_stages}  bubble {bubble(schedule, d):g}{formula}",
        fontsize=10,
    )
    kinds = sorted({p.kind for acts in schedule.ranks for a in acts for p in a.parts()}, key=list(Kind).index)
    handles = [Patch(facecolor=_COLOURS[k][0], label=_NAMES[k]) for k in kinds]
    if schedule.second_leg:
        handles.append(Patch(facecolor=_COLOURS[Kind.F][1], label=schedule.second_leg_label))
    if has_fb:
        handles.append(Patch(facecolor="white", edgecolor="black", label="F&B overlapped pair"))
    height = fig.get_figheight()
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))
    fig.savefig(out, dpi=dpi)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", choices=SCHEDULES, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--f", type=float, default=1.0, help="forward duration")
    parser.add_argument("--b", type=float, default=1.0, help="input-gradient backward duration")
    parser.add_argument("--w", type=float, default=1.0, help="weight-gradient duration")
    parser.add_argument("--fb", type=float, default=None, help="overlapped F&B duration (default f+b+w)")
    args = parser.parse_args(argv)
    try:
        schedule = validate(build_schedule(args.schedule, args.pp, args.microbatches))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    d = Durations(args.f, args.b, args.w, args.fb)
    draw_schedule(schedule, args.out, d)
    print(f"wrote {args.out}: bubble {bubble(schedule, d):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

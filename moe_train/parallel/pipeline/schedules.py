"""Pipeline schedules as data: the registry of schedule builders, and the 1F1B builder.

A schedule says *what* each pipeline rank computes and in which order (the data model, with the rule that
derives communication from it, is in :mod:`.actions`).  The same object is run by the executor, drawn by
:mod:`.draw` and checked and timed by :mod:`.analysis`, so the three can never disagree about what the
schedule is (DESIGN principle 4).

A schedule is added in one place: its builder here (or in a module of its own, like :mod:`.dualpipe`) and
one entry in :data:`SCHEDULES`.  Whatever is particular to it (activation bound, published bubble formula,
how to draw it) is set by its builder on the :class:`Schedule`; no other code looks at its name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .actions import Action, Durations, Kind, Schedule, bad_count, check_pp
from .dualpipe import dualpipe, dualpipev

# builder(pp, microbatches, overlap, **knobs) -> Schedule.  ``overlap`` (parallel.overlap) asks for FB
# pairs where the schedule has a choice; keyword-only parameters are knobs, read from the ``parallel.*``
# key of the same name (:func:`schedule_for`).
ScheduleBuilder = Callable[..., Schedule]


def _one_f_one_b_bubble(pp: int, d: Durations) -> float:
    """(PP-1)(F+B), B the full backward."""
    return (pp - 1) * (d.f + d.b + d.w)


def one_f_one_b(pp: int, microbatches: int, overlap: bool = False) -> Schedule:
    """PipeDream-flush 1F1B: rank r runs ``min(pp-1-r, m)`` warm-up forwards, then alternates one forward
    and one full backward, then drains the remaining backwards.

    At most ``min(pp - r, m)`` micro-batches are in flight on rank r, whatever ``microbatches`` is, which
    is why 1F1B replaced GPipe; its bubble is ``(pp-1)(F+B)`` per rank.

    ``overlap``: one more warm-up forward per rank, then each steady-state forward paired with the previous
    micro-batch's backward as an FB (the overlap engine runs the two interleaved); one more micro-batch in
    flight per rank. With pp = 1: F0, FB(F1|B0), …, FB(F(m-1)|B(m-2)), BW(m-1).
    """
    check_pp(pp, "1f1b")
    if microbatches < 1:
        raise bad_count(
            "parallel.microbatches", microbatches, "1f1b", "1F1B needs parallel.microbatches >= 1"
        )
    ranks = []
    for r in range(pp):
        warm = min(pp - 1 - r + overlap, microbatches)
        acts = [Action(Kind.F, r, m) for m in range(warm)]
        for i in range(microbatches - warm):
            if overlap:
                acts.append(Action(Kind.FB, r, warm + i, r, i))
            else:
                acts += [Action(Kind.F, r, warm + i), Action(Kind.BW, r, i)]
        acts += [Action(Kind.BW, r, m) for m in range(microbatches - warm, microbatches)]
        ranks.append(tuple(acts))
    return Schedule(
        name="1f1b",
        pp=pp,
        microbatches=microbatches,
        placement=tuple(range(pp)),
        chunks=tuple(range(pp)),
        pipelines=(tuple(range(pp)),),
        mb_pipeline=(0,) * microbatches,
        ranks=tuple(ranks),
        activation_bound=min(pp + overlap, microbatches),
        bubble_formula=functools.partial(_one_f_one_b_bubble, pp),
    )


def _interleaved_bubble(pp: int, v: int, d: Durations) -> float:
    """(PP-1)(F+B)/v (Narayanan et al. 2021), F and B a rank's full-stage times.  Durations are per action,
    i.e. per chunk of 1/v of a rank's layers: F = v*f, B = v*(b+w) (B the full backward)."""
    full_f, full_b = v * d.f, v * (d.b + d.w)
    return (pp - 1) * (full_f + full_b) / v


def interleaved_1f1b(
    pp: int, microbatches: int, overlap: bool = False, *, virtual_stages: int = 2
) -> Schedule:
    """Interleaved 1F1B (Megatron-LM's virtual pipeline, Narayanan et al. 2021, §2.2): the layer list is cut
    into ``v * pp`` chunks and rank r holds chunks r, r+pp, r+2pp, …, so a micro-batch passes every rank v
    times and the warm-up/drain (the bubble) shrinks by v: ``(pp-1)(F+B)/v`` for a rank's full-stage F, B.

    Micro-batches go in groups of pp: a rank forwards a group through its first chunk, then the same group
    through its second, …, and backwards in the same groups from its last chunk down.  Rank r first runs
    ``2(pp-1-r) + (v-1)pp`` forwards (all of them if fewer), then alternates one forward and one full
    backward, then drains.  ``overlap``: one more warm-up forward, then each steady forward and backward
    that belong to different chunks run as one FB (the overlap engine interleaves them).
    """
    v = virtual_stages
    name = "interleaved1f1b"
    check_pp(pp, name)
    if v < 2:
        raise bad_count(
            "parallel.virtual_stages", v, name, "needs parallel.virtual_stages >= 2 model chunks per rank"
        )
    if microbatches < 1 or microbatches % pp:
        raise bad_count(
            "parallel.microbatches",
            microbatches,
            name,
            f"Interleaved 1F1B needs parallel.microbatches a positive multiple of parallel.pp = {pp} "
            "(micro-batches go through each chunk in groups of pp)",
        )
    total = microbatches * v  # (chunk, micro-batch) units per rank

    def unit(k: int, backward: bool) -> tuple[int, int]:
        """The k-th forward (or backward) of a rank: (which of its chunks, micro-batch)."""
        group, i = divmod(k, pp * v)
        chunk = i // pp
        return (v - 1 - chunk if backward else chunk), group * pp + i % pp

    ranks = []
    for r in range(pp):
        # before its first backward a rank must have forwarded the first group through all its chunks
        # ((v-1)pp forwards beyond the first chunk's) while the gradient travels back from the far end
        # (two hops per rank further down)
        warm = min(2 * (pp - 1 - r) + (v - 1) * pp + overlap, total)
        fwd = [Action(Kind.F, r + c * pp, m) for c, m in (unit(k, False) for k in range(total))]
        bwd = [Action(Kind.BW, r + c * pp, m) for c, m in (unit(k, True) for k in range(total))]
        acts = fwd[:warm]
        for f, b in zip(fwd[warm:], bwd, strict=False):
            if overlap and f.stage != b.stage:  # as DualPipe: a pair holds two different chunks
                acts.append(Action(Kind.FB, f.stage, f.mb, b.stage, b.mb))
            else:
                acts += [f, b]
        acts += bwd[total - warm :]
        ranks.append(tuple(acts))
    n = v * pp
    return Schedule(
        name=name,
        pp=pp,
        microbatches=microbatches,
        placement=tuple(s % pp for s in range(n)),
        chunks=tuple(range(n)),
        pipelines=(tuple(range(n)),),
        mb_pipeline=(0,) * microbatches,
        ranks=tuple(ranks),
        activation_bound=min(2 * (pp - 1) + (v - 1) * pp + 1 + overlap, total),
        bubble_formula=functools.partial(_interleaved_bubble, pp, v),
        second_leg=frozenset(s for s in range(n) if (s // pp) % 2),
        second_leg_label="lighter: second, fourth, … pass through the ranks",
    )


# The one list of schedules: the values of parallel.schedule and their builders.
SCHEDULES: dict[str, ScheduleBuilder] = {
    "1f1b": one_f_one_b,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
    "interleaved1f1b": interleaved_1f1b,
}


def knobs_of(name: str) -> tuple[str, ...]:
    """The ``parallel.*`` keys schedule ``name`` reads besides pp, microbatches and overlap."""
    params = inspect.signature(SCHEDULES[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_schedule(name: str, pp: int, microbatches: int, overlap: bool = False, **knobs: Any) -> Schedule:
    """The schedule called ``name`` (the value of ``parallel.schedule``). ``overlap`` (parallel.overlap)
    asks for FB pairs where the schedule leaves a choice (1F1B's steady state); ``knobs`` are the
    schedule's own keys (:func:`knobs_of`), their defaults when left out."""
    if name not in SCHEDULES:
        raise ValueError(f"parallel.schedule={name!r} is not allowed: one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](pp, microbatches, overlap, **knobs)


def schedule_for(parallel: Any) -> Schedule:
    """The schedule a ``parallel`` config section asks for (its schedule, pp, microbatches, overlap and
    whatever keys the schedule's builder reads)."""
    p = parallel
    knobs = {k: getattr(p, k) for k in knobs_of(p.schedule)} if p.schedule in SCHEDULES else {}
    return build_schedule(p.schedule, p.pp, p.microbatches, p.overlap, **knobs)


__all__ = [
    "SCHEDULES",
    "Action",
    "Durations",
    "Kind",
    "Schedule",
    "ScheduleBuilder",
    "build_schedule",
    "dualpipe",
    "dualpipev",
    "interleaved_1f1b",
    "knobs_of",
    "one_f_one_b",
    "schedule_for",
]

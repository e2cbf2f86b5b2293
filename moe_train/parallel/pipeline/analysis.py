"""Model-free checks and timing of pipeline schedules.

Everything here reads a :class:`~.actions.Schedule` only, so a schedule can be proved runnable (every
micro-batch forwarded and backwarded once per stage, no deadlock, p2p sends and receives paired in the same
order on both ends) and its bubble measured before any GPU is involved.

The simulator executes each rank's list in order; an action starts when its rank is free and every input
it needs (derived from stage adjacency, see :mod:`.actions`) has been produced.  With per-kind durations
this gives the timeline the drawing shows and the idle time the bubble formulas predict.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from .actions import Action, Durations, Kind, Schedule

# An event is something one action produces and others wait for: ("F" | "B" | "W", stage, micro-batch).
# "B" = the stage's input gradient exists (made by B, BW or an FB's backward half); "W" = weight grads done.
Event = tuple[str, int, int]


class ScheduleError(ValueError):
    """A schedule that cannot run as written; ``problems`` lists every reason found."""

    def __init__(self, name: str, problems: list[str]) -> None:
        super().__init__(f"invalid {name} schedule:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Span:
    """One executed action on the simulated timeline."""

    rank: int
    index: int  # position in the rank's list
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """Result of :func:`simulate`. ``spans[r]`` are rank r's executed actions (all of them unless
    ``deadlock`` lists the actions each stuck rank was waiting at)."""

    spans: tuple[tuple[Span, ...], ...]
    deadlock: tuple[str, ...]

    @property
    def makespan(self) -> float:
        return max((s[-1].end for s in self.spans if s), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(s.end - s.start for s in self.spans[rank])

    def idle(self, rank: int) -> float:
        """Time rank ``rank`` waits between the step's start and its end (the makespan)."""
        return self.makespan - self.busy(rank)


# --------------------------------------------------------------------------------------- dependencies
def produces(action: Action) -> list[Event]:
    """Events an action makes, in the order its sends go out (forward activation first)."""
    out: list[Event] = []
    for p in action.parts():
        if p.kind is Kind.F:
            out.append(("F", p.stage, p.mb))
        elif p.kind is Kind.B:
            out.append(("B", p.stage, p.mb))
        elif p.kind is Kind.W:
            out.append(("W", p.stage, p.mb))
        else:  # BW
            out += [("B", p.stage, p.mb), ("W", p.stage, p.mb)]
    return out


def needs(schedule: Schedule, action: Action) -> list[Event]:
    """Events an action waits for, in the order its receives are posted (forward input first)."""
    out: list[Event] = []
    for p in action.parts():
        if p.kind is Kind.F:
            prev = schedule.prev_stage(p.stage)
            if prev is not None:
                out.append(("F", prev, p.mb))
        elif p.kind in (Kind.B, Kind.BW):
            out.append(("F", p.stage, p.mb))
            nxt = schedule.next_stage(p.stage)
            if nxt is not None:
                out.append(("B", nxt, p.mb))
        else:  # W
            out.append(("B", p.stage, p.mb))
    return out


def _producer_rank(schedule: Schedule, event: Event) -> int:
    return schedule.rank_of(event[1])


# ------------------------------------------------------------------------------------------- simulate
def simulate(schedule: Schedule, durations: Durations | None = None) -> Timeline:
    """Run the per-rank lists in order, each action as soon as its rank is free and its inputs exist.

    Start times depend only on inputs' end times and the previous action on the same rank, so repeated
    sweeps over the ranks give the exact event-driven result; a sweep that places nothing while actions
    remain is a deadlock (every rank waits for something that can no longer happen).
    """
    d = durations or Durations()
    done: dict[Event, float] = {}
    pos = [0] * schedule.pp
    free = [0.0] * schedule.pp
    spans: list[list[Span]] = [[] for _ in range(schedule.pp)]
    total = sum(len(a) for a in schedule.ranks)
    placed = 0
    while placed < total:
        progress = False
        for r, acts in enumerate(schedule.ranks):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                deps = needs(schedule, a)
                if any(e not in done for e in deps):
                    break
                ready = [done[e] + (d.comm if _producer_rank(schedule, e) != r else 0.0) for e in deps]
                start = max([free[r], *ready])
                end = start + d.of(a)
                spans[r].append(Span(r, pos[r], a, start, end))
                for e in produces(a):
                    done[e] = end
                free[r] = end
                pos[r] += 1
                placed += 1
                progress = True
        if not progress:
            stuck = tuple(
                f"rank {r} stuck at #{pos[r]} {acts[pos[r]]} waiting for "
                + ", ".join(
                    f"{k}{m}@s{s}" for k, s, m in needs(schedule, acts[pos[r]]) if (k, s, m) not in done
                )
                for r, acts in enumerate(schedule.ranks)
                if pos[r] < len(acts)
            )
            return Timeline(tuple(tuple(s) for s in spans), stuck)
    return Timeline(tuple(tuple(s) for s in spans), ())


# ---------------------------------------------------------------------------------------------- checks
def check_placement(schedule: Schedule) -> list[str]:
    """Every action runs on the rank holding its stage(s), for a micro-batch that flows through them."""
    problems = []
    for r, acts in enumerate(schedule.ranks):
        for i, a in enumerate(acts):
            for p in a.parts():
                if not 0 <= p.stage < schedule.n_stages:
                    problems.append(f"rank {r} #{i} {a}: no stage {p.stage}")
                elif schedule.rank_of(p.stage) != r:
                    problems.append(
                        f"rank {r} #{i} {a}: stage {p.stage} lives on rank {schedule.rank_of(p.stage)}"
                    )
                elif not 0 <= p.mb < schedule.microbatches:
                    problems.append(f"rank {r} #{i} {a}: no micro-batch {p.mb}")
                elif schedule.pipeline_of_stage(p.stage) != schedule.mb_pipeline[p.mb]:
                    problems.append(
                        f"rank {r} #{i} {a}: micro-batch {p.mb} does not flow through stage {p.stage}"
                    )
    return problems


def check_coverage(schedule: Schedule) -> list[str]:
    """Each micro-batch is forwarded once per stage of its pipeline and backwarded once: one BW, or one B
    and one W."""
    count: Counter[tuple[Kind, int, int]] = Counter()
    for acts in schedule.ranks:
        for a in acts:
            for p in a.parts():
                count[(p.kind, p.stage, p.mb)] += 1
    problems = []
    for m, pipe in enumerate(schedule.mb_pipeline):
        for s in schedule.pipelines[pipe]:
            f, b, w, bw = (count[(k, s, m)] for k in (Kind.F, Kind.B, Kind.W, Kind.BW))
            if f != 1:
                problems.append(f"micro-batch {m} stage {s}: {f} forwards (want 1)")
            if not (bw == 1 and b == w == 0) and not (bw == 0 and b == w == 1):
                problems.append(
                    f"micro-batch {m} stage {s}: B={b} W={w} BW={bw} (want BW once, or B and W once)"
                )
    return problems


Channel = tuple[int, int, str]  # (source rank, destination rank, "F" activations | "B" gradients | "" both)


def p2p_messages(
    schedule: Schedule, per_kind: bool = True
) -> tuple[dict[Channel, list[Event]], dict[Channel, list[Event]]]:
    """Derived point-to-point traffic: ``(sends, recvs)``, each mapping a channel to the events carried,
    in the order the source sends them and the order the destination consumes them.

    ``per_kind`` puts activations (``"F"``) and gradients (``"B"``) on separate channels of a rank pair;
    otherwise both share the channel ``(src, dst, "")``.
    """
    sends: dict[Channel, list[Event]] = defaultdict(list)
    recvs: dict[Channel, list[Event]] = defaultdict(list)
    for r, acts in enumerate(schedule.ranks):
        for a in acts:
            for e in needs(schedule, a):
                src = _producer_rank(schedule, e)
                if src != r:
                    recvs[(src, r, e[0] if per_kind else "")].append(e)
            for e in produces(a):
                kind, s = e[0], e[1]
                peer = (
                    schedule.send_forward_to(s)
                    if kind == "F"
                    else schedule.send_backward_to(s)
                    if kind == "B"
                    else None
                )
                if peer is not None:
                    sends[(r, peer, kind if per_kind else "")].append(e)
    return dict(sends), dict(recvs)


def check_p2p(schedule: Schedule, per_kind: bool = True) -> list[str]:
    """Every send has its receive, and on each channel the source sends in the order the destination
    consumes.

    That is what a FIFO point-to-point runtime (NCCL send/recv, gloo) needs to pair messages without
    per-message tags.  ``per_kind=True`` (the default) checks activations and gradients as two channels per
    rank pair (two process groups, or gloo tags); ``per_kind=False`` checks the stricter single channel per
    pair, which 1F1B meets but DualPipe (pp >= 6) and DualPipeV (pp >= 3) do not when each message is
    received just before it is consumed: there a runtime with one channel per pair must receive in the
    sender's order and hold early arrivals (:func:`recv_stash_depth`; docs/pipeline_schedules.md).
    """
    sends, recvs = p2p_messages(schedule, per_kind)
    problems = []
    for ch in sorted(set(sends) | set(recvs)):
        s, r = sends.get(ch, []), recvs.get(ch, [])
        if s == r:
            continue
        name = f"p2p {ch[0]}->{ch[1]}" + (f" [{ch[2]}]" if ch[2] else "")
        if Counter(s) != Counter(r):
            extra_s, extra_r = Counter(s) - Counter(r), Counter(r) - Counter(s)
            problems.append(f"{name}: unmatched sends {sorted(extra_s)} / receives {sorted(extra_r)}")
        else:
            i = next(i for i, (x, y) in enumerate(zip(s, r, strict=True)) if x != y)
            problems.append(f"{name}: message #{i} sent as {s[i]} but consumed as {r[i]}")
    return problems


def recv_stash_depth(schedule: Schedule) -> int:
    """How many messages a rank must hold, at most, if it receives from each peer over one FIFO channel in
    the peer's send order (activations and gradients mixed) while consuming them in its own list order.

    0 means consumption order equals send order everywhere (:func:`check_p2p` with ``per_kind=False``
    passes).  Receiving in send order never blocks longer than receiving in consumption order would: a
    message sent before the one needed has already been sent.
    """
    sends, recvs = p2p_messages(schedule, per_kind=False)
    worst = 0
    for ch, consumed in recvs.items():
        order, got, held = sends.get(ch, []), 0, set()
        for e in consumed:
            while e not in held and got < len(order):
                held.add(order[got])
                got += 1
            held.discard(e)
            worst = max(worst, len(held))
    return worst


def peak_activations(schedule: Schedule, release: str = "B") -> list[int]:
    """Per rank, the most stage-activations alive at once, in units of one stage's activations for one
    micro-batch.

    An activation is alive from the start of its forward until the end of its backward: ``release="B"``
    frees it when the input gradient is done (B or BW), ``release="W"`` only when the weight gradient is
    done too (W or BW; what is kept for W is in reality smaller: layer inputs and output gradients).  An FB
    holds its new forward and its old backward together, so it counts +1 before it releases.
    """
    if release not in ("B", "W"):
        raise ValueError(f"release must be 'B' or 'W', not {release!r}")
    peaks = []
    for acts in schedule.ranks:
        live = peak = 0
        for a in acts:
            for p in a.parts():
                if p.kind is Kind.F:
                    live += 1
                    peak = max(peak, live)
            for p in a.parts():
                if (
                    p.kind is Kind.BW
                    or (p.kind is Kind.B and release == "B")
                    or (p.kind is Kind.W and release == "W")
                ):
                    live -= 1
        peaks.append(peak)
    return peaks


def check(schedule: Schedule, max_activations: int | None = None) -> list[str]:
    """All model-free checks; returns the problems found (empty: the schedule is runnable)."""
    problems = check_placement(schedule) + check_coverage(schedule)
    if problems:  # the rest assumes actions sit on the right ranks
        return problems
    timeline = simulate(schedule)
    problems += [f"deadlock: {s}" for s in timeline.deadlock]
    problems += check_p2p(schedule)
    bound = schedule.activation_bound if max_activations is None else max_activations
    for r, peak in enumerate(peak_activations(schedule)):
        if peak > bound:
            problems.append(f"rank {r}: {peak} activations in flight, bound {bound}")
    return problems


def validate(schedule: Schedule, max_activations: int | None = None) -> Schedule:
    """Raise :class:`ScheduleError` listing every problem of ``schedule``; return it unchanged if none."""
    problems = check(schedule, max_activations)
    if problems:
        raise ScheduleError(schedule.name, problems)
    return schedule


# ---------------------------------------------------------------------------------------------- bubble
def idle_per_rank(schedule: Schedule, durations: Durations | None = None) -> list[float]:
    """Each rank's idle time in one step: makespan minus the rank's busy time (an FB counts as
    ``durations.fb``)."""
    t = simulate(schedule, durations)
    if t.deadlock:
        raise ScheduleError(schedule.name, [f"deadlock: {s}" for s in t.deadlock])
    return [t.idle(r) for r in range(schedule.pp)]


def bubble(schedule: Schedule, durations: Durations | None = None) -> float:
    """The pipeline bubble of one step: the largest per-rank idle time (:func:`idle_per_rank`).

    For 1F1B every rank idles the same; in DualPipe(V) the ranks at the turn idle longest, and that is the
    figure the papers' formulas give (``Schedule.paper_bubble``).
    """
    return max(idle_per_rank(schedule, durations))

"""DeepSeek-V3's DualPipe and its "cut-in-half" DualPipeV, built from one per-rank program.

Both are registered in :mod:`.schedules`; the vocabulary (stage, pipeline, chunk, the derived
communication) is that of :mod:`.actions`.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

from .actions import Action, Durations, Kind, Schedule, bad_count, check_pp

# Both schedules run the same per-rank *program* (DualPipeV is DualPipe "cut in half"): on each rank, phase
# 0 is the stage that micro-batches reach first from this rank's end of the pipeline, phase 1 the other one.
# The program is written in phases; _Emitter maps it to concrete (stage, micro-batch) actions by taking, per
# phase, the next micro-batch in arrival order (each stage sees its micro-batches in FIFO order).


@dataclass
class _Emitter:
    """Turns a phase-level program into actions for one rank (state is per call, nothing global)."""

    stages: tuple[int, int]  # stage of phase 0, stage of phase 1
    mbs: tuple[tuple[int, ...], tuple[int, ...]]  # micro-batches each phase processes, in order

    def __post_init__(self) -> None:
        self.acts: list[Action] = []
        self._next_f = [0, 0]
        self._next_b = [0, 0]
        self._deferred: deque[tuple[int, int]] = deque()  # (stage, mb) of B's whose W is pending, FIFO

    def _take(self, counter: list[int], phase: int) -> tuple[int, int]:
        mb = self.mbs[phase][counter[phase]]
        counter[phase] += 1
        return self.stages[phase], mb

    def f(self, phase: int) -> None:
        self.acts.append(Action(Kind.F, *self._take(self._next_f, phase)))

    def b(self, phase: int, split_w: bool = False) -> None:
        """Backward of the oldest pending micro-batch of ``phase``; ``split_w`` defers its W (zero bubble)."""
        stage, mb = self._take(self._next_b, phase)
        if split_w:
            self.acts.append(Action(Kind.B, stage, mb))
            self._deferred.append((stage, mb))
        else:
            self.acts.append(Action(Kind.BW, stage, mb))

    def w(self) -> None:
        self.acts.append(Action(Kind.W, *self._deferred.popleft()))

    def fb(self, f_phase: int, b_phase: int) -> None:
        stage, mb = self._take(self._next_f, f_phase)
        b_stage, b_mb = self._take(self._next_b, b_phase)
        self.acts.append(Action(Kind.FB, stage, mb, b_stage, b_mb))


def _dual_program(e: _Emitter, n: int, r: int, chunks: int) -> None:
    """The DualPipe per-rank program for ``n`` ranks on one side of the turn (DualPipeV: all ranks; DualPipe:
    half of them), rank index ``r`` counted from the outer end and ``chunks`` micro-batches per phase.

    Eight steps (DeepSeek-V3 report Fig. 5 and the DualPipe reference): warm-up forwards of phase 0, then
    alternate both phases' forwards until phase-1 backwards can start; fill the wait for phase-1 inputs
    with zero-bubble B/W pairs; the steady state of overlapped forward+backward pairs; then drain the
    backwards, splitting off the W's of the last ones and running them where the rank would otherwise
    wait.  The ranks at the turn (r == n-1) run their first steady pair un-overlapped, so that the forward
    the other side is waiting for leaves one F earlier instead of one F&B later.
    """
    at_turn = r == n - 1
    for _ in range(2 * (n - r - 1)):  # 1: nF0
        e.f(0)
    for _ in range(r + 1):  # 2: nF0F1
        e.f(0)
        e.f(1)
    for _ in range(n - r - 1):  # 3: nB1W1F1
        e.b(1, split_w=True)
        e.w()
        e.f(1)
    for i in range(chunks - 2 * n + r + 1):  # 4: nF0B1F1B0 (main step)
        if i == 0 and at_turn:
            e.f(0)
            e.b(1)
        else:
            e.fb(0, 1)
        e.fb(1, 0)
    for _ in range(n - r - 1):  # 5: nB1F1B0
        e.b(1)
        e.fb(1, 0)
    split = False  # 6: nB1B0, the second half with W deferred
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            split = True
        e.b(1, split_w=split)
        if i == (r + 1) // 2 and r % 2 == 0:
            split = True
        e.b(0, split_w=split)
    for _ in range(n - r - 1):  # 7: nWB0
        e.w()
        e.b(0, split_w=True)
    for _ in range(r + 1):  # 8: nW
        e.w()
    assert not e._deferred, "every deferred W is scheduled"


def _dual_bubble(stages: int, d: Durations) -> float:
    """DeepSeek-V3 Table 2 / DualPipe README: (PP/2-1)(F&B+B-3W), PP counting stages, B the full backward."""
    return (stages / 2 - 1) * (d.pair + (d.b + d.w) - 3 * d.w)


def dualpipe(pp: int, microbatches: int, overlap: bool = False) -> Schedule:
    """DeepSeek-V3's DualPipe: two copies of the model, micro-batches fed from both ends.

    Rank r holds stage r of the ``down`` pipeline (micro-batches ``0..m/2-1``, entering at rank 0) and
    stage ``2pp-1-r`` = position ``pp-1-r`` of the mirrored ``up`` pipeline (micro-batches ``m/2..m-1``,
    entering at rank pp-1).  Needs pp even and an even ``microbatches >= 2*pp``.  Its steady state is made
    of FB pairs whatever ``overlap`` says (parallel.overlap only decides whether they run interleaved).

    At most ``pp + 1`` stage-activations are in flight on a rank: the paper's PP + 1.
    """
    if pp < 2 or pp % 2:
        raise bad_count("parallel.pp", pp, "dualpipe", "DualPipe needs an even parallel.pp >= 2")
    if microbatches % 2 or microbatches < 2 * pp:
        raise bad_count(
            "parallel.microbatches",
            microbatches,
            "dualpipe",
            f"DualPipe needs an even parallel.microbatches >= 2*parallel.pp = {2 * pp} "
            "(half enter from each end)",
        )
    half = microbatches // 2
    down, up = tuple(range(half)), tuple(range(half, microbatches))
    ranks = []
    for r in range(pp):
        h = min(r, pp - 1 - r)  # distance from this rank's outer end
        if r < pp // 2:  # phase 0 = the down pipeline that enters here
            e = _Emitter(stages=(r, 2 * pp - 1 - r), mbs=(down, up))
        else:
            e = _Emitter(stages=(2 * pp - 1 - r, r), mbs=(up, down))
        _dual_program(e, pp // 2, h, half)
        ranks.append(tuple(e.acts))
    return Schedule(
        name="dualpipe",
        pp=pp,
        microbatches=microbatches,
        placement=tuple(range(pp)) + tuple(range(pp - 1, -1, -1)),
        chunks=tuple(range(pp)) * 2,
        pipelines=(tuple(range(pp)), tuple(range(pp, 2 * pp))),
        mb_pipeline=(0,) * half + (1,) * half,
        ranks=tuple(ranks),
        activation_bound=pp + 1,
        bubble_formula=functools.partial(_dual_bubble, pp),
        second_leg=frozenset(range(pp, 2 * pp)),
        second_leg_label="lighter: up direction",
    )


def dualpipev(pp: int, microbatches: int, overlap: bool = False) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): one model copy in 2*pp stages folded into a V.

    Rank r holds stages r and 2pp-1-r, so micro-batches enter and leave at rank 0 and turn at rank pp-1
    (stages pp-1 and pp, same rank: no transfer).  Needs ``microbatches >= 2*pp`` (any parity); FB pairs
    whatever ``overlap`` says, as DualPipe.

    At most ``2*pp + 1`` of its half-size stages are in flight on a rank: PP + 1 with PP = 2*pp stages, as
    in the DualPipe README table.
    """
    check_pp(pp, "dualpipev")
    if microbatches < 2 * pp:
        raise bad_count(
            "parallel.microbatches",
            microbatches,
            "dualpipev",
            f"DualPipeV needs parallel.microbatches >= 2*parallel.pp = {2 * pp}",
        )
    mbs = tuple(range(microbatches))
    ranks = []
    for r in range(pp):
        e = _Emitter(stages=(r, 2 * pp - 1 - r), mbs=(mbs, mbs))
        _dual_program(e, pp, r, microbatches)
        ranks.append(tuple(e.acts))
    return Schedule(
        name="dualpipev",
        pp=pp,
        microbatches=microbatches,
        placement=tuple(range(pp)) + tuple(range(pp - 1, -1, -1)),
        chunks=tuple(range(2 * pp)),
        pipelines=(tuple(range(2 * pp)),),
        mb_pipeline=(0,) * microbatches,
        ranks=tuple(ranks),
        activation_bound=2 * pp + 1,
        bubble_formula=functools.partial(_dual_bubble, 2 * pp),
        second_leg=frozenset(range(pp, 2 * pp)),
        second_leg_label="lighter: way back up the V",
    )

"""Pipeline schedules as data: per rank, the ordered list of compute actions.

A schedule says *what* each pipeline rank computes and in which order; it holds no tensors and knows no
model.  The same object is run by the executor, drawn by :mod:`.draw` and checked and timed by
:mod:`.analysis`, so the three can never disagree about what the schedule is (DESIGN principle 4).

Vocabulary
----------
*stage*: one slice of the layer list placed on one rank (``Schedule.placement[stage]`` is its rank).
*pipeline*: the ordered stages a micro-batch flows through.  1F1B and DualPipeV have one pipeline; DualPipe
has two, ``down`` (stages ``0..pp-1`` on ranks ``0..pp-1``) and ``up`` (stages ``pp..2pp-1`` on ranks
``pp-1..0``), each a full copy of the model.  *chunk*: which slice of the model's layer list a stage holds
(``Schedule.chunks[stage]``); in DualPipe stages ``j`` and ``pp+j`` hold the same chunk (two copies whose
gradients must be summed before the optimizer step).

Communication is not an action: it is derived from stage adjacency.  The rule, which the executor and
:mod:`.analysis` both follow:

* ``F(s, m)`` needs the output of ``F(prev_stage(s), m)``; when that ran on another rank, it is one receive
  from ``rank_of(prev_stage(s))``, and one send on that rank as soon as its forward finishes.
* ``B(s, m)`` / ``BW(s, m)`` need ``F(s, m)`` (stashed activations, same rank) and the input gradient made
  by the backward of ``next_stage(s)`` (one receive from ``rank_of(next_stage(s))`` when remote).  The last
  stage of a pipeline starts the backward from its own loss.
* ``W(s, m)`` needs ``B(s, m)`` on the same rank; it sends nothing.
* An action sends its outputs right after it finishes (forward activation first, then input gradient) and
  receives its inputs right before it starts (forward input first, then output gradient).  A runtime must
  post sends without waiting for them (``isend``), which every NCCL/gloo pipeline runtime does.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

SCHEDULES = ("1f1b", "dualpipe", "dualpipev")


class Kind(str, enum.Enum):
    """What an action computes."""

    F = "F"  # forward of one micro-batch through one stage
    B = "B"  # backward for the stage *inputs* only; the weight gradient is deferred to a later W
    W = "W"  # the deferred weight-gradient part of an earlier B
    BW = "BW"  # full backward: input and weight gradients together (1F1B, and B without zero-bubble split)
    FB = "FB"  # forward of one micro-batch overlapped with the full backward (BW) of another


@dataclass(frozen=True)
class Action:
    """One compute step of one rank.

    ``stage``/``mb`` name the forward for F, the backward for B, W and BW.  An FB carries two pairs: the
    forward of (``stage``, ``mb``) and the full backward (input + weight gradients, as DualPipe's
    overlapped chunk does) of (``b_stage``, ``b_mb``); the two halves are independent, so an overlap engine
    may interleave them so that each half's all-to-all runs under the other's compute.
    """

    kind: Kind
    stage: int
    mb: int
    b_stage: int | None = None
    b_mb: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))  # accept "F" as well as Kind.F
        has_b = self.b_stage is not None or self.b_mb is not None
        if (self.kind is Kind.FB) != has_b:
            raise ValueError(f"only FB actions carry b_stage/b_mb: {self!r}")
        if self.kind is Kind.FB and (self.b_stage is None or self.b_mb is None):
            raise ValueError(f"FB needs both b_stage and b_mb: {self!r}")

    @property
    def forward(self) -> Action | None:
        """The forward part (an F action) of F and FB, else None."""
        if self.kind is Kind.F:
            return self
        if self.kind is Kind.FB:
            return Action(Kind.F, self.stage, self.mb)
        return None

    @property
    def backward(self) -> Action | None:
        """The input-gradient-producing part (B, BW, or the BW half of an FB), else None."""
        if self.kind in (Kind.B, Kind.BW):
            return self
        if self.kind is Kind.FB:
            assert self.b_stage is not None and self.b_mb is not None
            return Action(Kind.BW, self.b_stage, self.b_mb)
        return None

    def parts(self) -> tuple[Action, ...]:
        """The plain actions this action performs: ``(self,)``, or ``(F, BW)`` for an FB."""
        if self.kind is Kind.FB:
            f, b = self.forward, self.backward
            assert f is not None and b is not None
            return (f, b)
        return (self,)

    def __str__(self) -> str:
        if self.kind is Kind.FB:
            return f"FB(F{self.mb}@s{self.stage}|B{self.b_mb}@s{self.b_stage})"
        return f"{self.kind.value}{self.mb}@s{self.stage}"


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the placement an executor needs to run them.

    ``ranks[r]`` is rank r's list, executed in order.  ``placement[s]`` is the rank holding stage s,
    ``chunks[s]`` the slice of the layer list it holds (out of ``n_chunks``), ``pipelines[p]`` the
    ordered stages of pipeline p and ``mb_pipeline[m]`` the pipeline micro-batch m flows through.
    """

    name: str
    pp: int
    microbatches: int
    placement: tuple[int, ...]
    chunks: tuple[int, ...]
    pipelines: tuple[tuple[int, ...], ...]
    mb_pipeline: tuple[int, ...]
    ranks: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if len(self.ranks) != self.pp:
            raise ValueError(f"{self.name}: {len(self.ranks)} rank lists for pp={self.pp}")
        if len(self.mb_pipeline) != self.microbatches:
            raise ValueError(f"{self.name}: mb_pipeline has {len(self.mb_pipeline)} entries")
        seen = sorted(s for p in self.pipelines for s in p)
        if seen != list(range(len(self.placement))):
            raise ValueError(f"{self.name}: every stage must be in exactly one pipeline")

    # -- placement -------------------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.placement)

    @property
    def n_chunks(self) -> int:
        """How many slices the model's layer list is cut into."""
        return max(self.chunks) + 1

    def rank_of(self, stage: int) -> int:
        return self.placement[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages rank ``rank`` holds, in stage order (the modules it must build)."""
        return tuple(s for s, r in enumerate(self.placement) if r == rank)

    def pipeline_of_stage(self, stage: int) -> int:
        return next(i for i, p in enumerate(self.pipelines) if stage in p)

    def microbatches_of(self, pipeline: int) -> tuple[int, ...]:
        return tuple(m for m, p in enumerate(self.mb_pipeline) if p == pipeline)

    def prev_stage(self, stage: int) -> int | None:
        """The stage feeding ``stage`` its forward input (None for a pipeline's first stage)."""
        p = self.pipelines[self.pipeline_of_stage(stage)]
        i = p.index(stage)
        return p[i - 1] if i > 0 else None

    def next_stage(self, stage: int) -> int | None:
        """The stage consuming ``stage``'s forward output (None for a pipeline's last stage, the loss)."""
        p = self.pipelines[self.pipeline_of_stage(stage)]
        i = p.index(stage)
        return p[i + 1] if i + 1 < len(p) else None

    def is_first_stage(self, stage: int) -> bool:
        """True where the forward reads the micro-batch's tokens (embedding)."""
        return self.prev_stage(stage) is None

    def is_last_stage(self, stage: int) -> bool:
        """True where the forward ends in the loss (head, MTP) and the backward starts."""
        return self.next_stage(stage) is None

    # -- derived p2p peers (None: nothing to exchange, or the neighbour stage is on the same rank) ------
    def _remote(self, stage: int, other: int | None) -> int | None:
        if other is None or self.placement[other] == self.placement[stage]:
            return None
        return self.placement[other]

    def recv_forward_from(self, stage: int) -> int | None:
        """Rank to receive F(stage)'s input activation from."""
        return self._remote(stage, self.prev_stage(stage))

    def send_forward_to(self, stage: int) -> int | None:
        """Rank to send F(stage)'s output activation to."""
        return self._remote(stage, self.next_stage(stage))

    def recv_backward_from(self, stage: int) -> int | None:
        """Rank to receive the gradient of stage's output from (before B/BW)."""
        return self._remote(stage, self.next_stage(stage))

    def send_backward_to(self, stage: int) -> int | None:
        """Rank to send the gradient of stage's input to (after B/BW)."""
        return self._remote(stage, self.prev_stage(stage))

    def __str__(self) -> str:
        lines = [f"{self.name} pp={self.pp} microbatches={self.microbatches} stages={self.n_stages}"]
        for r, acts in enumerate(self.ranks):
            lines.append(f"rank {r}: " + " ".join(str(a) for a in acts))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- errors
def _bad(key: str, value: int, name: str, allowed: str) -> ValueError:
    return ValueError(f"{key}={value} is not allowed for parallel.schedule={name}: {allowed}")


def _check_pp(pp: int, name: str) -> None:
    if pp < 1:
        raise _bad("parallel.pp", pp, name, "needs parallel.pp >= 1")


# ------------------------------------------------------------------------------------------------ 1F1B
def one_f_one_b(pp: int, microbatches: int, overlap: bool = False) -> Schedule:
    """PipeDream-flush 1F1B: rank r runs ``min(pp-1-r, m)`` warm-up forwards, then alternates one forward
    and one full backward, then drains the remaining backwards.

    At most ``min(pp - r, m)`` micro-batches are in flight on rank r, whatever ``microbatches`` is, which
    is why 1F1B replaced GPipe; its bubble is ``(pp-1)(F+B)`` per rank.

    ``overlap``: one more warm-up forward per rank, then each steady-state forward paired with the previous
    micro-batch's backward as an FB (the overlap engine runs the two interleaved); one more micro-batch in
    flight per rank. With pp = 1: F0, FB(F1|B0), …, FB(F(m-1)|B(m-2)), BW(m-1).
    """
    _check_pp(pp, "1f1b")
    if microbatches < 1:
        raise _bad("parallel.microbatches", microbatches, "1f1b", "1F1B needs parallel.microbatches >= 1")
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
    )


# ------------------------------------------------------------------------------- DualPipe / DualPipeV
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


def dualpipe(pp: int, microbatches: int) -> Schedule:
    """DeepSeek-V3's DualPipe: two copies of the model, micro-batches fed from both ends.

    Rank r holds stage r of the ``down`` pipeline (micro-batches ``0..m/2-1``, entering at rank 0) and
    stage ``2pp-1-r`` = position ``pp-1-r`` of the mirrored ``up`` pipeline (micro-batches ``m/2..m-1``,
    entering at rank pp-1).  Needs pp even and an even ``microbatches >= 2*pp``.
    """
    if pp < 2 or pp % 2:
        raise _bad("parallel.pp", pp, "dualpipe", "DualPipe needs an even parallel.pp >= 2")
    if microbatches % 2 or microbatches < 2 * pp:
        raise _bad(
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
    )


def dualpipev(pp: int, microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): one model copy in 2*pp stages folded into a V.

    Rank r holds stages r and 2pp-1-r, so micro-batches enter and leave at rank 0 and turn at rank pp-1
    (stages pp-1 and pp, same rank: no transfer).  Needs ``microbatches >= 2*pp`` (any parity).
    """
    _check_pp(pp, "dualpipev")
    if microbatches < 2 * pp:
        raise _bad(
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
    )


_BUILDERS = {"1f1b": one_f_one_b, "dualpipe": dualpipe, "dualpipev": dualpipev}


def build_schedule(name: str, pp: int, microbatches: int, overlap: bool = False) -> Schedule:
    """The schedule called ``name`` (the value of ``parallel.schedule``). ``overlap`` (parallel.overlap)
    pairs 1F1B's steady state into FB actions; DualPipe and DualPipeV have theirs already."""
    if name not in _BUILDERS:
        raise ValueError(f"parallel.schedule={name!r} is not one of {', '.join(SCHEDULES)}")
    if name == "1f1b":
        return one_f_one_b(pp, microbatches, overlap)
    return _BUILDERS[name](pp, microbatches)

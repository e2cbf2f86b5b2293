"""The data model of pipeline schedules: actions, schedules, action durations.

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
from collections.abc import Callable
from dataclasses import dataclass, field


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
class Durations:
    """Time of one action of each kind, in any unit.

    ``b`` is the input-gradient backward only, so a full backward (BW) takes ``b + w``; the papers' B is
    our ``b + w``.  ``fb`` is an overlapped pair (default: no overlap gain, ``f + b + w``).  ``comm`` is
    added to every cross-rank dependency (0: communication fully hidden, the papers' assumption).
    """

    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0

    @property
    def pair(self) -> float:
        """Duration of an FB (the papers' F&B)."""
        return self.fb if self.fb is not None else self.f + self.b + self.w

    def of(self, action: Action) -> float:
        k = action.kind
        if k is Kind.F:
            return self.f
        if k is Kind.B:
            return self.b
        if k is Kind.W:
            return self.w
        if k is Kind.BW:
            return self.b + self.w
        return self.pair


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
    # What only the builder knows, stated by it so that no reader branches on ``name``:
    # the most stage-activations in flight on any rank (analysis.check enforces it) ...
    activation_bound: int
    # ... the published bubble formula for these durations, if there is one (a picklable callable:
    # schedules travel between processes) ...
    bubble_formula: Callable[[Durations], float] | None = field(default=None, compare=False)
    # ... and the stages drawn in the lighter shade, with what the shade means in the legend
    second_leg: frozenset[int] = frozenset()
    second_leg_label: str = ""

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

    def paper_bubble(self, durations: Durations | None = None) -> float:
        """The published bubble formula for this schedule and these durations (ValueError if none)."""
        if self.bubble_formula is None:
            raise ValueError(f"no published bubble formula for schedule {self.name!r}")
        return self.bubble_formula(durations or Durations())

    def __str__(self) -> str:
        lines = [f"{self.name} pp={self.pp} microbatches={self.microbatches} stages={self.n_stages}"]
        for r, acts in enumerate(self.ranks):
            lines.append(f"rank {r}: " + " ".join(str(a) for a in acts))
        return "\n".join(lines)


def bad_count(key: str, value: int, name: str, allowed: str) -> ValueError:
    """The error a builder raises for a count it cannot schedule (key, value and what is allowed)."""
    return ValueError(f"{key}={value} is not allowed for parallel.schedule={name}: {allowed}")


def check_pp(pp: int, name: str) -> None:
    if pp < 1:
        raise bad_count("parallel.pp", pp, name, "needs parallel.pp >= 1")

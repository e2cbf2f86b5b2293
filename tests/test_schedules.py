"""Pipeline schedules checked as data: no model, no processes (DESIGN principle 4)."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest

from moe_train.parallel.pipeline.analysis import (
    Durations,
    ScheduleError,
    bubble,
    check,
    check_coverage,
    check_p2p,
    check_placement,
    idle_per_rank,
    peak_activations,
    recv_stash_depth,
    simulate,
    validate,
)
from moe_train.parallel.pipeline.schedules import (
    SCHEDULES,
    Action,
    Kind,
    Schedule,
    build_schedule,
    dualpipe,
    one_f_one_b,
    schedule_for,
)

CASES = (
    [("1f1b", pp, m) for pp in (1, 2, 4) for m in (1, 3, 8)]
    + [
        ("dualpipe", pp, m)
        for pp in (2, 4, 8)
        for m in sorted({2 * pp, 2 * pp + 2} | ({20} if 20 >= 2 * pp else set()))
    ]
    + [("dualpipev", pp, m) for pp in (1, 2, 4) for m in sorted({2 * pp, 2 * pp + 1, 3 * pp})]
    + [("interleaved1f1b", pp, m) for pp in (1, 2, 4) for m in (pp, 2 * pp, 3 * pp)]
)


def _replace_rank(s: Schedule, rank: int, acts: list[Action]) -> Schedule:
    ranks = list(s.ranks)
    ranks[rank] = tuple(acts)
    return dataclasses.replace(s, ranks=tuple(ranks))


@pytest.mark.parametrize("name,pp,m", CASES)
def test_schedule_is_valid(name: str, pp: int, m: int) -> None:
    s = build_schedule(name, pp, m)
    assert check(s) == []
    assert validate(s) is s
    peaks = peak_activations(s)
    assert max(peaks) == s.activation_bound  # 1F1B: min(pp, m); DualPipe: pp + 1; DualPipeV: 2pp + 1
    assert peak_activations(s, release="W") == peaks  # deferred W's never raise the peak
    # each stage runs F, B and W of its micro-batches in arrival order: FIFO stashes suffice
    for stage in range(s.n_stages):
        for kinds in ((Kind.F,), (Kind.B, Kind.BW), (Kind.W, Kind.BW)):
            mbs = [
                p.mb
                for a in s.ranks[s.rank_of(stage)]
                for p in a.parts()
                if p.kind in kinds and p.stage == stage
            ]
            assert mbs == sorted(mbs) == list(s.microbatches_of(s.pipeline_of_stage(stage)))


@pytest.mark.parametrize("name,pp,m", CASES)
def test_bubble_matches_paper_formula(name: str, pp: int, m: int) -> None:
    # the papers' chart regime: forward = input-gradient backward, W no longer than them, any F&B overlap
    s = build_schedule(name, pp, m)
    for d in (Durations(1, 1, 1), Durations(1, 1, 1, 2), Durations(1, 1, 0.5, 2.5), Durations(1.5, 1.5, 0.5)):
        assert bubble(s, d) == pytest.approx(s.paper_bubble(d)), d


def test_one_f_one_b_bubble_any_durations() -> None:
    rng = random.Random(0)
    for _ in range(20):
        d = Durations(rng.uniform(0.2, 2), rng.uniform(0.2, 2), rng.uniform(0, 2))
        pp, m = rng.choice([1, 2, 3, 4, 8]), rng.randint(1, 12)
        s = one_f_one_b(pp, m)
        assert idle_per_rank(s, d) == pytest.approx([(pp - 1) * (d.f + d.b + d.w)] * pp)


@pytest.mark.parametrize(
    "name,pp,m", [("dualpipe", 8, 20), ("dualpipe", 4, 8), ("dualpipev", 4, 9), ("dualpipev", 2, 4)]
)
def test_dual_bubble_closed_form(name: str, pp: int, m: int) -> None:
    """Beyond F = B: exactly (PP/2-1)(F&B + F - 2W) when F >= B; between that and the paper's when F < B."""
    s = build_schedule(name, pp, m)
    half = (pp if name == "dualpipe" else 2 * pp) / 2 - 1
    rng = random.Random(1)
    for _ in range(20):
        b = rng.uniform(0.5, 2)
        w = rng.uniform(0, b)
        f = rng.uniform(0.3 * b, 2.5 * b)
        d = Durations(f, b, w, rng.uniform(max(f, b + w), f + b + w))
        ours = half * (d.pair + f - 2 * w)
        if f >= b:
            assert bubble(s, d) == pytest.approx(ours)
        else:
            assert ours - 1e-9 <= bubble(s, d) <= s.paper_bubble(d) + 1e-9


def test_dualpipev_matches_dualpipe_with_twice_the_ranks() -> None:
    """DualPipeV on pp ranks is DualPipe on 2pp ranks cut in half: same per-rank timeline shape."""
    d = Durations(1, 1, 1, 2)
    assert idle_per_rank(build_schedule("dualpipev", 4, 10), d) == idle_per_rank(dualpipe(8, 20), d)[:4]


def test_placement_and_neighbours() -> None:
    s = dualpipe(4, 8)
    assert s.stages_of(1) == (1, 6) and s.rank_of(6) == 1
    assert s.chunks[1] == s.chunks[5] == 1  # down stage 1 and up stage 5 hold the same layers (two copies)
    assert s.next_stage(1) == 2 and s.prev_stage(4) is None and s.next_stage(7) is None
    assert s.recv_forward_from(5) == 3 and s.send_forward_to(5) == 1  # up pipeline flows rank 3 -> 0
    assert s.recv_backward_from(1) == 2 and s.send_backward_to(1) == 0
    assert s.is_first_stage(0) and s.is_first_stage(4) and s.is_last_stage(3) and s.is_last_stage(7)
    assert set(s.microbatches_of(0)) == set(range(4)) and set(s.microbatches_of(1)) == set(range(4, 8))
    v = build_schedule("dualpipev", 2, 4)
    assert v.stages_of(1) == (1, 2) and v.next_stage(1) == 2
    assert v.send_forward_to(1) is None  # the turn of the V stays on the rank
    assert v.n_chunks == 4 and one_f_one_b(3, 2).n_chunks == 3
    fb = next(a for a in s.ranks[0] if a.kind is Kind.FB)
    assert [p.kind for p in fb.parts()] == [Kind.F, Kind.BW] and fb.forward and fb.backward
    assert Action("F", 0, 0).kind is Kind.F


def test_p2p_single_channel() -> None:
    """1F1B meets the strict one-FIFO-per-pair order; DualPipe needs a one-message stash (or two channels)."""
    for pp, m in ((1, 3), (4, 8)):
        assert check_p2p(one_f_one_b(pp, m), per_kind=False) == []
    assert recv_stash_depth(one_f_one_b(4, 8)) == 0
    assert check_p2p(dualpipe(4, 8), per_kind=False) == []
    assert check_p2p(dualpipe(8, 20), per_kind=False) != []
    assert recv_stash_depth(dualpipe(8, 20)) == 1
    assert recv_stash_depth(build_schedule("dualpipev", 4, 8)) == 1


@pytest.mark.parametrize(
    "name,pp,m,key",
    [
        ("1f1b", 0, 4, "parallel.pp"),
        ("1f1b", 2, 0, "parallel.microbatches"),
        ("dualpipe", 3, 12, "parallel.pp"),
        ("dualpipe", 4, 7, "parallel.microbatches"),
        ("dualpipe", 4, 6, "parallel.microbatches"),
        ("dualpipev", 2, 3, "parallel.microbatches"),
        ("dualpipev", 0, 4, "parallel.pp"),
        ("interleaved1f1b", 0, 4, "parallel.pp"),
        ("interleaved1f1b", 2, 3, "parallel.microbatches"),
        ("interleaved1f1b", 4, 6, "parallel.microbatches"),
    ],
)
def test_bad_counts_raise(name: str, pp: int, m: int, key: str) -> None:
    with pytest.raises(ValueError, match=f"{key}={pp if key == 'parallel.pp' else m} "):
        build_schedule(name, pp, m)


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="parallel.schedule"):
        build_schedule("gpipe", 2, 4)


# ---------------------------------------------------------------------------- the checker catches mistakes
def test_swap_creates_deadlock() -> None:
    s = one_f_one_b(2, 2)  # rank 0: F0 F1 BW0 BW1, rank 1: F0 BW0 F1 BW1
    acts = list(s.ranks[0])
    acts[1], acts[2] = acts[2], acts[1]  # rank 0 now waits for BW0 before sending F1: still fine
    assert check(_replace_rank(s, 0, acts)) == []
    rank1 = [Action(Kind.F, 1, 0), Action(Kind.F, 1, 1), Action(Kind.BW, 1, 1), Action(Kind.BW, 1, 0)]
    bad = _replace_rank(_replace_rank(s, 0, acts), 1, rank1)  # rank 1 wants F1 before rank 0 can send it
    t = simulate(bad)
    assert t.deadlock and any("rank 1" in msg for msg in t.deadlock)
    assert any("deadlock" in p for p in check(bad))
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(bad)
    with pytest.raises(ScheduleError):
        bubble(bad)


def test_swap_in_dualpipe_deadlocks() -> None:
    s = dualpipe(4, 8)
    acts = list(s.ranks[0])
    i = next(i for i, a in enumerate(acts) if a.kind is Kind.FB)
    acts[0], acts[i] = acts[i], acts[0]  # its backward half needs a forward that now comes later
    problems = check(_replace_rank(s, 0, acts))
    assert any("deadlock" in p and "rank 0" in p for p in problems)


def test_dropped_w_is_reported() -> None:
    s = dualpipe(4, 8)
    acts = list(s.ranks[2])
    w = next(a for a in acts if a.kind is Kind.W)
    acts.remove(w)
    problems = check_coverage(_replace_rank(s, 2, acts))
    assert problems == [f"micro-batch {w.mb} stage {w.stage}: B=1 W=0 BW=0 (want BW once, or B and W once)"]


def test_duplicated_forward_and_wrong_rank_are_reported() -> None:
    s = one_f_one_b(2, 3)
    assert check_coverage(_replace_rank(s, 0, [*s.ranks[0], Action(Kind.F, 0, 1)]))
    assert check_placement(_replace_rank(s, 0, [*s.ranks[0], Action(Kind.F, 1, 0)]))


def test_out_of_order_p2p_is_reported() -> None:
    s = one_f_one_b(3, 4)
    acts = list(s.ranks[2])  # last rank: F0 BW0 F1 BW1 ...; consume F1 before F0
    acts[:4] = [Action(Kind.F, 2, 1), Action(Kind.BW, 2, 1), Action(Kind.F, 2, 0), Action(Kind.BW, 2, 0)]
    bad = _replace_rank(s, 2, acts)
    assert not simulate(bad).deadlock  # a buffered simulator is happy ...
    assert any("p2p 1->2" in p for p in check_p2p(bad))  # ... but a FIFO channel would pair the wrong tensors


def test_activation_bound_is_enforced() -> None:
    s = dualpipe(4, 8)
    assert peak_activations(s) == [5, 5, 5, 5]  # pp + 1
    assert any("activations in flight" in p for p in check(s, max_activations=4))


def test_registry_names_its_schedules_and_their_facts() -> None:
    """Every registered builder makes a schedule under its own name that states its facts (activation bound,
    bubble formula) itself; the layout checks reject a name the registry does not hold."""
    from moe_train.config import ConfigError, ParallelConfig, TrainConfig
    from moe_train.parallel.layout import check_layout

    for name in SCHEDULES:
        s = schedule_for(ParallelConfig(schedule=name, pp=2, microbatches=8))
        assert s.name == name and s.activation_bound >= 1
        assert s.paper_bubble(Durations()) >= 0
        again = pickle.loads(pickle.dumps(s))  # schedules travel between processes
        assert again == s and again.paper_bubble(Durations()) == s.paper_bubble(Durations())
    cfg = TrainConfig()
    cfg.parallel.schedule = "gpipe"
    with pytest.raises(ConfigError, match="parallel.schedule='gpipe' is not allowed: one of 1f1b, dualpipe"):
        check_layout(cfg, 1)


# ------------------------------------------------------------------------------------------ interleaved 1F1B
INTERLEAVED = [
    (pp, v, m) for pp in (1, 2, 3, 4, 8) for v in (2, 3, 4) for m in sorted({pp, 2 * pp, 3 * pp, 8})
]


@pytest.mark.parametrize("pp,v,m", [c for c in INTERLEAVED if c[2] % c[0] == 0])
def test_interleaved_bubble_is_one_f_one_b_over_v(pp: int, v: int, m: int) -> None:
    """v chunks per rank (rank r holds chunks r, r+pp, …): every check passes, and every rank idles exactly
    (pp-1)(F+B)/v, F and B a rank's full-stage times, for any durations.  Durations are per action, i.e.
    per chunk: F = v·f, B = v·(b+w), so the bubble is (pp-1)(f+b+w) in chunk units."""
    s = build_schedule("interleaved1f1b", pp, m, virtual_stages=v)
    assert check(s) == [] and s.n_stages == v * pp
    assert [s.stages_of(r) for r in range(pp)] == [tuple(range(r, v * pp, pp)) for r in range(pp)]
    assert max(peak_activations(s)) == s.activation_bound
    rng = random.Random(pp * 100 + v * 10 + m)
    for _ in range(5):
        d = Durations(rng.uniform(0.2, 2), rng.uniform(0.2, 2), rng.uniform(0, 2))
        full_f, full_b = v * d.f, v * (d.b + d.w)
        assert idle_per_rank(s, d) == pytest.approx([(pp - 1) * (full_f + full_b) / v] * pp)
        assert s.paper_bubble(d) == pytest.approx((pp - 1) * (full_f + full_b) / v)


@pytest.mark.parametrize("pp,v,m", [(1, 2, 3), (2, 2, 4), (2, 3, 6), (4, 2, 8), (4, 3, 12), (8, 2, 16)])
def test_interleaved_overlap_pairs_different_chunks(pp: int, v: int, m: int) -> None:
    """overlap=True: steady-state forward and backward of different chunks fused into FB pairs; still a
    valid schedule, one more activation in flight."""
    plain = build_schedule("interleaved1f1b", pp, m, virtual_stages=v)
    s = build_schedule("interleaved1f1b", pp, m, True, virtual_stages=v)
    assert check(s) == []
    pairs = [a for acts in s.ranks for a in acts if a.kind is Kind.FB]
    assert pairs and all(a.stage != a.b_stage for a in pairs)
    assert s.activation_bound == plain.activation_bound + 1 == max(peak_activations(s))


def test_interleaved_knob_comes_from_the_config() -> None:
    from moe_train.config import ConfigError, TrainConfig
    from moe_train.parallel.layout import check_layout

    cfg = TrainConfig()
    cfg.parallel.schedule, cfg.parallel.microbatches, cfg.parallel.virtual_stages = "interleaved1f1b", 2, 3
    cfg.model.num_hidden_layers = 4
    assert check_layout(cfg, 1).n_stages == 3
    cfg.parallel.virtual_stages = 1
    with pytest.raises(ConfigError, match="parallel.virtual_stages=1 is not allowed"):
        check_layout(cfg, 1)

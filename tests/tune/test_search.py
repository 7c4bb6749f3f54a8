"""The search logic, over a fake measure function and a fake clock."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from cvserve.tune.search import (
    DECODERS,
    Measurement,
    Search,
    Settings,
    better,
    proposals,
)

CORES = 4


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def model_throughput(s: Settings) -> float:
    """A server whose throughput peaks at batch 16, 2 instances x 2 threads, delay 10 ms,
    2 preprocessing threads and simplejpeg; every knob's effect is unimodal."""
    t = 100.0
    t *= {1: 0.4, 2: 0.55, 4: 0.7, 8: 0.85, 16: 1.0, 32: 0.9, 64: 0.8}[s.max_batch]
    t *= {(1, 4): 0.8, (2, 2): 1.0, (4, 1): 0.7}.get((s.instances, s.intra_op_threads), 0.5)
    t *= 1.0 - abs(s.max_delay_ms - 10.0) / 400.0
    t *= 1.0 - abs(s.preprocess_threads - 2) * 0.06
    t *= {"pil-reduced": 1.0, "simplejpeg": 1.1, "opencv": 0.95}[s.decoder]
    return t


class FakeMeasure:
    """Takes ``cost_s`` of fake time per candidate; meets the SLO when ``slo`` says so."""

    def __init__(self, clock: FakeClock, cost_s: float = 30.0, meets=lambda s: True):
        self.clock, self.cost_s, self.meets = clock, cost_s, meets
        self.calls: list[Settings] = []

    def __call__(self, s: Settings) -> Measurement:
        self.calls.append(s)
        self.clock.t += self.cost_s
        pts = [{"concurrency": 1, "p99_ms": 50.0 + s.max_batch, "throughput_rps": 10.0}]
        if not self.meets(s):
            return Measurement(points=pts)
        return Measurement(points=pts, throughput_rps=model_throughput(s), p99_ms=90.0,
                           concurrency=8)  # fmt: skip


def test_defaults_are_cvserve_serve_defaults():
    s = Settings.defaults(CORES)
    assert (s.max_batch, s.max_delay_ms, s.instances) == (8, 5.0, 1)
    assert (s.intra_op_threads, s.preprocess_threads, s.decoder) == (4, 4, "simplejpeg")


def test_proposals_keep_threads_times_instances_within_the_cores():
    s = Settings.defaults(CORES)
    up = list(proposals("instances", s, CORES, +1))
    assert [(p.instances, p.intra_op_threads) for p in up] == [(2, 2), (4, 1)]
    assert list(proposals("instances", s, CORES, -1)) == []
    # with 2 instances, intra-op threads may only go down to leave cores to preprocessing
    two = replace(s, instances=2, intra_op_threads=2)
    assert list(proposals("intra_op_threads", two, CORES, +1)) == []
    assert [p.intra_op_threads for p in proposals("intra_op_threads", two, CORES, -1)] == [1]
    assert [p.max_batch for p in proposals("max_batch", s, CORES, +1)] == [16, 32, 64]
    assert [p.max_batch for p in proposals("max_batch", s, CORES, -1)] == [4, 2, 1]
    # off the ladder (6 threads is between 4 and 8): the neighbours are 4 and 8
    six = replace(s, preprocess_threads=6)
    assert [p.preprocess_threads for p in proposals("preprocess_threads", six, CORES, -1)] == [
        4,
        2,
        1,
    ]
    assert [p.preprocess_threads for p in proposals("preprocess_threads", six, CORES, +1)] == [8]


def test_better_prefers_meeting_the_slo_then_throughput_then_lower_p99():
    meets = Measurement(throughput_rps=10.0, p99_ms=50.0, concurrency=1)
    more = Measurement(throughput_rps=10.2, p99_ms=50.0, concurrency=1)
    miss = Measurement(points=[{"concurrency": 1, "p99_ms": 80.0}])
    closer = Measurement(points=[{"concurrency": 1, "p99_ms": 60.0}])
    assert better(meets, miss) and not better(miss, meets)
    assert better(more, meets) and not better(more, meets, min_gain=0.03)
    assert better(closer, miss) and not better(miss, closer)
    assert better(miss, None)


def test_search_finds_the_optimum_without_an_exhaustive_grid():
    clock = FakeClock()
    measure = FakeMeasure(clock)
    res = Search(measure, CORES, budget_s=10_000, clock=clock).run()
    best = res.best.settings
    assert (best.max_batch, best.instances, best.intra_op_threads) == (16, 2, 2)
    assert (best.max_delay_ms, best.preprocess_threads, best.decoder) == (10.0, 2, "simplejpeg")
    assert res.winner is res.best and res.stop_reason == "converged"
    assert (
        res.default.settings == Settings.defaults(CORES)
        and measure.calls[0] == res.default.settings
    )
    # every candidate measured once, and far fewer than the grid
    assert len(set(measure.calls)) == len(measure.calls)
    grid = 3 * 7 * 8 * 4 * 4 * len(DECODERS)
    assert len(measure.calls) < 40 < grid
    assert res.best.measurement.throughput_rps == max(model_throughput(s) for s in measure.calls)


def test_a_direction_stops_at_the_first_step_that_does_not_improve():
    clock = FakeClock()
    measure = FakeMeasure(clock)
    Search(measure, CORES, budget_s=10_000, clock=clock, knobs=("max_batch",)).run()
    # 8 -> 16 improves, 32 is worse: 64 never tried; 'down' never tried after 'up' helped
    assert [s.max_batch for s in measure.calls] == [8, 16, 32]


def test_pruned_direction_tries_down_when_up_does_not_help():
    clock = FakeClock()
    measure = FakeMeasure(clock)
    start = replace(Settings.defaults(CORES), max_batch=32)
    Search(measure, CORES, budget_s=10_000, clock=clock, knobs=("max_batch",), start=start).run()
    assert [s.max_batch for s in measure.calls] == [32, 64, 16, 8]


def test_budget_is_respected_and_defaults_always_measured():
    clock = FakeClock()
    measure = FakeMeasure(clock, cost_s=30.0)
    res = Search(measure, CORES, budget_s=100.0, clock=clock).run()
    assert res.stop_reason == "budget"
    assert len(measure.calls) == 3  # 30 s each: a fourth would end at 120 s
    assert clock.t <= 100.0
    # a budget smaller than one candidate still measures the defaults, and only them
    clock2 = FakeClock()
    m2 = FakeMeasure(clock2, cost_s=30.0)
    res2 = Search(m2, CORES, budget_s=10.0, clock=clock2).run()
    assert m2.calls == [Settings.defaults(CORES)] and res2.stop_reason == "budget"


def test_known_candidates_are_reused_not_measured_again():
    clock = FakeClock()
    first = FakeMeasure(clock)
    res1 = Search(first, CORES, budget_s=100.0, clock=clock).run()  # cut short by the budget
    known = {c.settings: c.measurement for c in res1.candidates}
    clock2 = FakeClock()
    second = FakeMeasure(clock2)
    res2 = Search(second, CORES, budget_s=10_000, clock=clock2, known=known).run()
    assert not set(second.calls) & set(known)
    assert [c.settings for c in res2.candidates[: len(known)]] == [
        c.settings for c in res1.candidates
    ]
    assert all(c.reused for c in res2.candidates[: len(known)])
    assert not any(c.reused for c in res2.candidates[len(known) :])
    # the resumed search ends where an uninterrupted one does
    clock3 = FakeClock()
    whole = Search(FakeMeasure(clock3), CORES, budget_s=10_000, clock=clock3).run()
    assert res2.best.settings == whole.best.settings


def test_reused_measurements_count_for_the_budget_estimate():
    clock = FakeClock()
    defaults = Settings.defaults(CORES)
    known = {defaults: Measurement(throughput_rps=1.0, p99_ms=1.0, concurrency=1, wall_s=50.0)}
    measure = FakeMeasure(clock, cost_s=50.0)
    Search(measure, CORES, budget_s=40.0, clock=clock, known=known).run()
    assert measure.calls == []  # 50 s expected, 40 left


def test_no_candidate_meets_the_slo():
    clock = FakeClock()
    measure = FakeMeasure(clock, meets=lambda s: False)
    res = Search(measure, CORES, budget_s=10_000, clock=clock).run()
    assert res.winner is None
    assert not any(c.measurement.meets_slo for c in res.candidates)
    # it still moved toward the SLO: p99 at c=1 grows with the batch, so batch 1 is best
    assert res.best.settings.max_batch == 1


def test_search_moves_from_missing_to_meeting_the_slo():
    clock = FakeClock()
    measure = FakeMeasure(clock, meets=lambda s: s.max_batch <= 4)
    res = Search(measure, CORES, budget_s=10_000, clock=clock).run()
    assert res.winner is not None and res.winner.settings.max_batch == 4
    assert not res.default.measurement.meets_slo


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
def test_every_candidate_fits_the_cores(cores):
    clock = FakeClock()
    measure = FakeMeasure(clock)
    Search(measure, cores, budget_s=10_000, clock=clock).run()
    for s in measure.calls:
        assert s.instances * s.intra_op_threads <= cores
        assert s.instances >= 1 and s.intra_op_threads >= 1 and s.preprocess_threads >= 1


def test_candidates_are_reported_as_they_finish():
    clock = FakeClock()
    events, seen = [], []
    Search(FakeMeasure(clock), CORES, budget_s=100.0, clock=clock,
           progress=events.append, on_candidate=seen.append).run()  # fmt: skip
    kinds = [e["event"] for e in events]
    assert kinds[0] == "candidate" and kinds[-1] == "end"
    assert kinds.count("done") == len(seen) == 3
    done = [e for e in events if e["event"] == "done"]
    assert [e["done"] for e in done] == [1, 2, 3]
    assert all(a["time_left_s"] >= b["time_left_s"] for a, b in itertools.pairwise(done))


def test_public_names():
    import cvserve.tune as tune

    assert sorted(tune.__all__) == sorted([
        "Candidate", "Measurement", "Search", "SearchResult", "ServerMeasurer", "Settings",
        "TuneConfig", "TuneError", "TuneReport", "TuneState", "TuneStateError", "run_tune",
        "state_path", "sweep",
    ])  # fmt: skip
    for name in tune.__all__:
        assert getattr(tune, name) is not None

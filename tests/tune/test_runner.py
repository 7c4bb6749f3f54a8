"""``run_tune`` over a fake measure function: the YAML it writes, the state file, resume."""

from __future__ import annotations

import json

import pytest

from cvserve.config import load_config
from cvserve.tune import Measurement, Settings, TuneConfig, TuneStateError, run_tune, state_path


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Measure:
    """Throughput grows with the batch up to 16; 20 s of fake time per candidate."""

    def __init__(self, clock: Clock, meets: bool = True) -> None:
        self.clock, self.meets, self.calls = clock, meets, []

    def __call__(self, s: Settings) -> Measurement:
        self.calls.append(s)
        self.clock.t += 20.0
        tput = 10.0 * min(s.max_batch, 16) - max(0, s.max_batch - 16) * 0.1
        pts = [{"concurrency": 1, "throughput_rps": 5.0, "p99_ms": 30.0, "errors": 0}]
        if not self.meets:
            return Measurement(points=pts)
        return Measurement(points=pts, throughput_rps=tput, p99_ms=80.0, concurrency=4)


@pytest.fixture
def images(data_dir):
    return data_dir / "images" / "small"


def tune(tmp_path, images, clock, measure, **kw):
    cfg = TuneConfig(model="tiny-resnet", images=images, slo_p99_ms=100.0,
                     out=tmp_path / "tuned.yaml", cores=2, **kw)  # fmt: skip
    return run_tune(cfg, measure=measure, clock=clock)


def test_writes_a_config_serve_loads_with_a_header(tmp_path, images):
    clock = Clock()
    report = tune(tmp_path, images, clock, Measure(clock), budget_s=10_000)
    w = report.result.winner
    assert w is not None and w.settings.max_batch == 16
    text = report.config_path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("160.0 req/s at concurrency 4, p99 80.0 ms (SLO 100 ms)" in h for h in header)
    assert any("defaults: 80.0 req/s" in h and "2.00x" in h for h in header)
    assert any("on 2 cores" in h for h in header)
    cfg = load_config(report.config_path)
    (m,) = cfg.models
    assert (m.name, m.batching.max_batch_size, m.batching.max_delay_ms) == ("tiny-resnet", 16, 5.0)
    assert (m.batching.instances, m.intra_op_threads) == (
        w.settings.instances,
        w.settings.intra_op_threads,
    )
    assert m.decoder == w.settings.decoder
    assert cfg.preprocess_threads == w.settings.preprocess_threads
    # the table: in the state file, every candidate, the winner marked, defaults first
    doc = json.loads(state_path(report.config_path).read_text())
    table = doc["last_run"]["table"]
    assert len(table) == len(report.result.candidates) == len(doc["candidates"])
    assert table[0]["move"] == "default" and table[0]["vs_default"] == 1.0
    assert [r["n"] for r in table if r["winner"]] == [table.index(doc["last_run"]["winner"]) + 1]
    assert doc["last_run"]["winner"]["vs_default"] == 2.0


def test_rerun_reuses_measured_candidates(tmp_path, images):
    clock = Clock()
    first = Measure(clock)
    r1 = tune(tmp_path, images, clock, first, budget_s=70)  # 3 candidates fit
    assert r1.result.stop_reason == "budget" and len(first.calls) == 3
    clock2 = Clock()
    second = Measure(clock2)
    r2 = tune(tmp_path, images, clock2, second, budget_s=10_000)
    assert not set(second.calls) & set(first.calls)
    assert [c.reused for c in r2.result.candidates[:3]] == [True] * 3
    assert r2.result.stop_reason == "converged"
    doc = json.loads(state_path(r2.config_path).read_text())
    assert len(doc["candidates"]) == len(first.calls) + len(second.calls)
    # a third run measures nothing at all
    clock3 = Clock()
    third = Measure(clock3)
    r3 = tune(tmp_path, images, clock3, third, budget_s=10_000)
    assert third.calls == [] and r3.result.best.settings == r2.result.best.settings


def test_other_slo_or_fresh_measures_again(tmp_path, images):
    clock = Clock()
    tune(tmp_path, images, clock, Measure(clock), budget_s=50)
    clock2 = Clock()
    other = Measure(clock2)
    cfg = TuneConfig(model="tiny-resnet", images=images, slo_p99_ms=200.0,
                     out=tmp_path / "tuned.yaml", cores=2, budget_s=50)  # fmt: skip
    run_tune(cfg, measure=other, clock=clock2)
    assert other.calls[0] == Settings.defaults(2)
    clock3 = Clock()
    fresh = Measure(clock3)
    tune(tmp_path, images, clock3, fresh, budget_s=50, fresh=True)
    assert fresh.calls[0] == Settings.defaults(2)
    doc = json.loads(state_path(tmp_path / "tuned.yaml").read_text())
    assert len(doc["candidates"]) == len(fresh.calls)  # --fresh started the file over


def test_no_candidate_meets_the_slo(tmp_path, images):
    clock = Clock()
    report = tune(tmp_path, images, clock, Measure(clock, meets=False), budget_s=200)
    assert report.result.winner is None and report.config_path is None
    assert not (tmp_path / "tuned.yaml").exists()
    doc = json.loads(state_path(tmp_path / "tuned.yaml").read_text())
    assert doc["last_run"]["winner"] is None
    assert len(doc["last_run"]["table"]) == len(report.result.candidates) > 1
    assert not any(r["meets_slo"] for r in doc["last_run"]["table"])


def test_a_foreign_state_file_is_refused(tmp_path, images):
    state_path(tmp_path / "tuned.yaml").write_text('{"schema": "something/else"}')
    clock = Clock()
    with pytest.raises(TuneStateError, match="--fresh"):
        tune(tmp_path, images, clock, Measure(clock), budget_s=50)

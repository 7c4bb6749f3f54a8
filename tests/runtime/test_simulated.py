"""The simulated accelerator: profiles, timing, host CPU, device sharing, output shapes."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import cvserve.runtime as runtime
from cvserve.runtime import (
    OrtRuntime,
    RuntimeInputError,
    SimDevice,
    SimModel,
    SimProfile,
    SimulatedRuntime,
    packaged_profiles,
)
from cvserve.tasks.base import get_head

TASK_MODELS = ["tiny-resnet", "tiny-segformer", "tiny-rtdetr", "tiny-depth", "tiny-yolos"]


def test_public_names():
    assert sorted(runtime.__all__) == sorted(
        [
            "OrtOptions", "OrtRuntime", "Runtime", "RuntimeInputError", "SimDevice", "SimModel",
            "SimProfile", "SimulatedRuntime", "open_runtime", "open_runtimes", "packaged_profiles",
        ]
    )  # fmt: skip


# --- profiles ----------------------------------------------------------------------------
def test_interpolation_and_extrapolation():
    p = SimProfile.parse("8:20, 1:10, 32:50")  # any order
    assert p.batch_sizes == [1, 8, 32]
    ms = lambda b: p.latency_s(b) * 1000.0  # noqa: E731
    assert ms(1) == pytest.approx(10.0)
    assert ms(8) == pytest.approx(20.0)
    assert ms(4) == pytest.approx(10 + 3 / 7 * 10)  # linear between 1 and 8
    assert ms(20) == pytest.approx(20 + 12 / 24 * 30)  # between 8 and 32
    assert ms(64) == pytest.approx(50 + 32 * 30 / 24)  # along the last two points
    assert SimProfile.parse("4:8").latency_s(1) == pytest.approx(0.008)  # below: smallest
    assert SimProfile.parse("4:8").latency_s(10) == pytest.approx(0.020)  # one point: per image
    # a tail that does not rise extrapolates per image of the last point, never falls
    flat = SimProfile.parse("1:5,16:40,32:38")
    assert flat.latency_s(64) == pytest.approx(0.038 * 2)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        p.latency_s(0)


def test_scaled_divides_latencies():
    p = SimProfile.parse("1:10,8:20")
    fast = p.scaled(10)
    assert fast.latency_ms == {1: 1.0, 8: 2.0}
    assert fast.latency_s(4) == pytest.approx(p.latency_s(4) / 10)
    assert "divided by 10" in fast.source and p.latency_ms == {1: 10.0, 8: 20.0}
    for bad in (0, -2, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            p.scaled(bad)


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "empty"),
        ("1:", "latency is missing"),
        ("1", "no such file"),
        ("0:1", "positive integer"),
        ("2.5:1", "positive integer"),
        ("-1:1", "positive integer"),
        ("1:0", "must be > 0"),
        ("1:-3", "must be > 0"),
        ("1:abc", "not a number"),
        ("x:1", "not a number"),
        ("1:1,1:2", "given twice"),
        ("missing/profile.json", "no such file"),
    ],
)
def test_malformed_profiles_are_clear_errors(text, says):
    with pytest.raises(ValueError, match=says):
        SimProfile.parse(text)


def test_profile_files_round_trip_and_need_only_latencies(tmp_path):
    p = SimProfile.parse("1:0.9,8:2.4").scaled(2)
    path = p.save(tmp_path / "sub" / "p.json")
    doc = json.loads(path.read_text())
    assert doc["schema"] == "cvserve.profile/1" and doc["latency_ms"] == {"1": 0.45, "8": 1.2}
    assert doc["created"] and doc["source"].startswith("given inline")
    back = SimProfile.parse(str(path))
    assert back.latency_ms == p.latency_ms and back.source == p.source

    minimal = tmp_path / "min.json"
    minimal.write_text('{"latency_ms": {"2": 3, "1": 2}, "custom": [1]}')
    m = SimProfile.parse(minimal)
    assert m.latency_ms == {1: 2.0, 2: 3.0} and m.extra == {"custom": [1]}
    assert json.loads(m.save(tmp_path / "again.json").read_text())["custom"] == [1]

    for content, says in [
        ("{not json", "not valid JSON"),
        ('{"model": "x"}', "needs 'latency_ms'"),
        ('{"latency_ms": {"1": null}}', "latency not given"),
        ('{"latency_ms": {"1": 0}}', "must be > 0"),
        ('{"schema": "other/2", "latency_ms": {"1": 1}}', "schema"),
        ("[1, 2]", "expected a JSON object"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(ValueError, match=says):
            SimProfile.parse(str(bad))
    unreadable = tmp_path / "dir.json"
    unreadable.mkdir()
    with pytest.raises(ValueError, match="cannot read profile"):
        SimProfile.parse(str(unreadable))


def test_packaged_profiles_state_their_published_source():
    profiles = packaged_profiles()
    assert {"resnet50-trt-a100", "resnet50-trt-t4"} <= set(profiles)
    for name, path in profiles.items():
        doc = json.loads(path.read_text())
        p = SimProfile.parse(name)  # addressable by short name
        assert p.latency_ms == {int(b): ms for b, ms in doc["latency_ms"].items()}
        assert "github.com/NVIDIA/DeepLearningExamples" in doc["source"]
        assert doc["precision"] == "FP16" and "TensorRT" in doc["runtime"]
        # the published throughput agrees with the latency we keep (batch / latency), to
        # within the spread of an average of a client-side measurement
        for b, ips in doc["published_inferences_per_s"].items():
            assert int(b) * 1000.0 / doc["latency_ms"][b] == pytest.approx(ips, rel=0.15)


# --- timing and host CPU ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_path(model_cache):
    from cvserve.models import store

    return str(store.model_path(store.load_meta("tiny-resnet", model_cache), model_cache))


def _batch(n: int) -> np.ndarray:
    return np.zeros((n, 3, 32, 32), np.float32)


class _FakeTime:
    """The simulator's clock, made exact: ``sleep`` advances ``perf_counter`` by what was
    asked, so its stage times are what it asked for, however busy the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch) -> _FakeTime:
    import cvserve.runtime.simulated as simulated

    clock = _FakeTime()
    monkeypatch.setattr(simulated, "time", clock)
    return clock


def test_batch_latency_follows_the_profile(resnet_path, fake_time):
    """A correctness property of the simulator (not a speed test): run() sleeps for the
    profile's time, interpolated, and reports it as ``infer``."""
    rt = SimulatedRuntime(resnet_path, "1:50,8:100,32:250")
    rt.run(_batch(1))  # first call resolves output shapes
    for n, want in [(1, 0.050), (4, 0.050 + 3 / 7 * 0.050), (8, 0.100), (16, 0.150), (40, 0.300)]:
        fake_time.sleeps.clear()
        t0 = fake_time.now
        rt.run(_batch(n))
        assert fake_time.sleeps == [pytest.approx(want)], n
        assert fake_time.now - t0 == pytest.approx(want)
        assert rt.last_stages["infer"] == pytest.approx(want)


def test_batch_latency_is_slept_on_the_real_clock(resnet_path):
    """On the real clock a run takes at least the profile's time (it may take longer on a
    busy machine: speed is for benchmarks/, not for a test)."""
    rt = SimulatedRuntime(resnet_path, "1:50,8:100")
    rt.run(_batch(1))
    t0 = time.perf_counter()
    rt.run(_batch(4))
    took = time.perf_counter() - t0
    want = 0.050 + 3 / 7 * 0.050
    assert took >= want and took >= rt.last_stages["infer"] >= want


def test_inference_burns_no_host_cpu(resnet_path):
    rt = SimulatedRuntime(resnet_path, "1:400")
    rt.run(_batch(1))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rt.run(_batch(1))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert wall >= 0.4
    assert cpu < 0.10 * wall, f"{cpu * 1000:.1f} ms of CPU in {wall * 1000:.0f} ms"


def test_copies_take_bytes_over_bandwidth(resnet_path, fake_time):
    # 0.05 GB/s: 8 x 3x32x32 float32 in = 98304 B -> 1.97 ms; out 8 x 10 float32 -> 6.4 us
    rt = SimulatedRuntime(resnet_path, SimDevice("8:20", h2d_gbps=0.05))
    rt.run(_batch(8))
    st = rt.last_stages
    assert set(st) == {"batch_wait", "h2d", "infer", "d2h"}
    assert st["h2d"] == pytest.approx(98304 / 0.05e9)
    assert st["d2h"] == pytest.approx(8 * 10 * 4 / 0.05e9) and st["infer"] == pytest.approx(0.020)
    assert st["batch_wait"] == 0.0
    plain = SimulatedRuntime(resnet_path, "1:20")
    plain.run(_batch(8))
    assert set(plain.last_stages) == {"batch_wait", "infer"}


def _run_together(runtimes) -> tuple[float, list[dict]]:
    start = threading.Barrier(len(runtimes))

    def go(rt):
        start.wait()
        rt.run(_batch(1))

    threads = [threading.Thread(target=go, args=(rt,)) for rt in runtimes]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [rt.last_stages for rt in runtimes]


def test_one_device_runs_one_batch_at_a_time(resnet_path):
    model = SimModel(resnet_path)
    one = SimDevice("1:200", devices=1)
    rts = [SimulatedRuntime(resnet_path, one, model=model) for _ in range(2)]
    for rt in rts:
        rt.run(_batch(1))
    took, stages = _run_together(rts)
    assert took >= 2 * 0.200  # one after the other
    waits = sorted(s["batch_wait"] for s in stages)
    assert waits[0] < 0.200  # the first took the device without waiting for a run

    two = SimDevice("1:200", devices=2)
    rts = [SimulatedRuntime(resnet_path, two, model=model) for _ in range(2)]
    took, stages = _run_together(rts)
    assert took >= 0.200
    # side by side: neither waited for the other's whole run (0.2 s) to take a device
    assert all(s["batch_wait"] < 0.200 for s in stages)


def test_input_is_validated_like_onnxruntime(resnet_path):
    rt = SimulatedRuntime(resnet_path, "1:1")
    with pytest.raises(RuntimeInputError, match="dtype"):
        rt.run(np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(RuntimeInputError, match="shape"):
        rt.run(np.zeros((1, 3, 33, 32), np.float32))
    with pytest.raises(RuntimeInputError, match="shape"):
        rt.run(np.zeros((3, 32, 32), np.float32))
    assert rt.last_stages is None


# --- outputs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_paths(model_cache):
    from cvserve.models import store

    return {
        name: (store.ensure_built(name, model_cache), model_cache)
        for name in TASK_MODELS  # tiny-resnet is built already; the others take seconds
    }


@pytest.mark.parametrize("name", TASK_MODELS)
def test_outputs_match_the_real_model_and_feed_every_head(task_paths, name, data_dir):
    from cvserve.images.preprocess import Preprocessor
    from cvserve.models import store

    meta, cache = task_paths[name]
    path = store.model_path(meta, cache)
    real = OrtRuntime(path)
    sim = SimulatedRuntime(path, "1:1,8:2")
    assert (sim.input_name, sim.input_dtype, sim.output_names) == (
        real.input_name, real.input_dtype, real.output_names,
    )  # fmt: skip
    assert sim.input_shape == real.input_shape

    pre = Preprocessor(meta.preprocess)
    x = np.zeros((3, *meta.preprocess.input_shape), meta.preprocess.dtype)
    metas = [
        pre.run((data_dir / "images" / "small" / "dog.jpg").read_bytes(), x[i]) for i in range(3)
    ]
    want = real.run(x)
    got = sim.run(x)
    assert [(o.shape, o.dtype) for o in got] == [(o.shape, o.dtype) for o in want]
    assert all(not o.flags.writeable for o in got)
    assert [o.shape for o in sim.run(x[:1])] == [(1, *o.shape[1:]) for o in want]
    again = sim.run(x)
    assert all(np.array_equal(a, b) for a, b in zip(got, again, strict=True))  # deterministic

    head = get_head(meta)
    for i in range(3):
        rows = [o[i] for o in got]
        result = head.postprocess(rows, metas[i])
        assert result  # every head turns the simulated rows into an answer
    with pytest.raises(ValueError):
        got[0][0].flat[0] = 1  # nobody can change the shared arrays


def test_start_up_line_is_short(caplog):
    """The log line a simulated model starts with names the device and its latency range,
    not the profile's whole source (which ``GET /v1/models/NAME`` has)."""
    import logging

    from cvserve.runtime.sim_profile import SimProfile

    a100 = SimProfile.parse("resnet50-trt-a100")
    assert len(a100.source) > 200  # what the line used to carry
    line = a100.summary()
    assert len(line) <= 80 and "A100" in line and "batch 1 2.13 ms" in line, line
    assert "batch 128 48.1 ms" in line
    assert SimProfile.parse("1:0.9,8:2.4").summary() == "batch 1 0.9 ms .. batch 8 2.4 ms"
    long = SimProfile.from_pairs("1:1", device="x" * 200)
    assert len(long.summary()) <= 80 and long.summary().startswith("xxx")

    from cvserve.config import ModelConfig
    from cvserve.serving import model as served

    cfg = ModelConfig("m", runtime="simulated", sim_profile="resnet50-trt-a100")
    caplog.set_level(logging.INFO, logger="cvserve.serving.model")
    try:
        served._make_runtimes("/nonexistent.onnx", cfg)
    except Exception:  # noqa: BLE001 - no model file: only the line is under test
        pass
    (msg,) = [r.getMessage() for r in caplog.records if "simulated accelerator" in r.getMessage()]
    assert len(msg) <= 140 and "github.com" not in msg, msg

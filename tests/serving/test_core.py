"""The serving core with a runtime that takes the time we say and burns no CPU (the
simulated accelerator): admission, a deadline while queued, a client that hangs up, a bad
image beside good ones, and the pool's one submit call."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from cvserve.config import BatchConfig, ModelConfig
from cvserve.errors import RequestError
from cvserve.models import store
from cvserve.serving.core import AUTO_WAIT_ROUNDS, Admission, PreprocessPool, ServiceRate
from cvserve.serving.errors import DeadlineExceeded, Overloaded
from cvserve.serving.model import ModelServer
from cvserve.trace import Trace

BAD = b"\xff\xd8\xff\xe0 not a jpeg at all"


@pytest.fixture(scope="module")
def photo(data_dir) -> bytes:
    return (data_dir / "images" / "small" / "dog.jpg").read_bytes()


def _server(cache, pool, profile="1:300,8:300", **batching) -> ModelServer:
    meta = store.load_meta("tiny-resnet", cache)
    cfg = ModelConfig(
        name="m",
        model="tiny-resnet",
        batching=BatchConfig(**{"max_batch_size": 4, "max_delay_ms": 5, **batching}),
        runtime="simulated",
        sim_profile=profile,
    )
    return ModelServer(meta, str(store.model_path(meta, cache)), cfg, pool, max_pixels=10**8)


async def _started(ms: ModelServer) -> ModelServer:
    await ms.start()
    return ms


def _predict(ms: ModelServer, data: bytes, timeout_s: float = 10.0, **params):
    trace = Trace()
    return trace, ms.predict(data, trace, trace.start + timeout_s, params)


async def _until(condition, timeout_s: float = 30.0) -> None:
    """Wait for ``condition()`` to hold: a step of the test, not a guess at how long it takes."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.002)


def _idle(ms: ModelServer, pool: PreprocessPool) -> None:
    """Nothing is left behind: no admitted request, no thread held, no batch slot pending."""
    assert ms.inflight == 0
    assert pool.semaphore._value == pool.threads
    assert ms.batcher._upstream == 0
    assert ms.batcher._open is None or ms.batcher._open.pending == 0


def test_admission_refuses_past_max_queue_at_once(model_cache, photo):
    async def main():
        pool = PreprocessPool(2)
        ms = await _started(_server(model_cache, pool, max_queue=2))
        first = [asyncio.ensure_future(_predict(ms, photo)[1]) for _ in range(2)]
        await asyncio.sleep(0)  # both admitted
        with pytest.raises(Overloaded) as e:
            await _predict(ms, photo)[1]
        pending_when_refused = sum(not f.done() for f in first)
        done = await asyncio.gather(*first)
        await ms.stop()
        _idle(ms, pool)
        return e.value, pending_when_refused, done

    err, pending_when_refused, done = asyncio.run(main())
    assert err.status == 429 and err.retry_after_s >= 1 and err.detail["max_queue"] == 2
    assert pending_when_refused == 2  # refused at once, not after the queue moved
    assert [p.batch_size for p in done] == [2, 2]


def test_deadline_while_queued_for_a_thread(model_cache, photo):
    async def main():
        pool = PreprocessPool(1)
        ms = await _started(_server(model_cache, pool))
        gate, busy = threading.Event(), threading.Event()

        def hold():
            busy.set()
            gate.wait(10)

        blocker = asyncio.ensure_future(
            pool.submit(Trace(), hold, deadline=time.perf_counter() + 10, stage="decode")
        )
        await _until(busy.is_set)  # the only thread is busy
        trace, fut = _predict(ms, photo, timeout_s=0.1)
        with pytest.raises(DeadlineExceeded, match="waiting for a worker thread"):
            await fut
        gate.set()
        await blocker
        # the server is whole again: the next request goes through
        ok = await _predict(ms, photo)[1]
        await ms.stop()
        _idle(ms, pool)
        return trace, ok

    trace, ok = asyncio.run(main())
    assert set(trace.stages) == {"queue"} and trace.stages["queue"] >= 0.09
    assert ok.result["top_k"]


def test_client_that_hangs_up_during_preprocessing_frees_its_slot(model_cache, data_dir):
    large = (data_dir / "images" / "large" / "42_IndexError.jpg").read_bytes()

    async def main():
        pool = PreprocessPool(2)
        ms = await _started(_server(model_cache, pool, profile="1:20,8:20"))
        _, fut = _predict(ms, large)
        task = asyncio.ensure_future(fut)
        await _until(lambda: pool.semaphore._value < pool.threads)  # decoding, in the thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the thread finishes its work, then gives the slot and itself back
        for _ in range(200):
            if pool.semaphore._value == pool.threads:
                break
            await asyncio.sleep(0.01)
        after = await _predict(ms, large)[1]
        await ms.stop()
        _idle(ms, pool)
        return after

    after = asyncio.run(main())
    assert after.batch_size == 1  # the abandoned slot was squeezed out, not batched


def test_client_that_hangs_up_during_inference_costs_its_batch_mate_nothing(model_cache, photo):
    async def main():
        pool = PreprocessPool(2)
        # the batch waits (up to 2 s) for a request on its way, so a and b ride together
        ms = await _started(_server(model_cache, pool, max_delay_ms=2000))
        a = asyncio.ensure_future(_predict(ms, photo)[1])
        b = asyncio.ensure_future(_predict(ms, photo)[1])
        await _until(lambda: ms.batcher.busy_instances > 0)  # inference running (300 ms)
        a.cancel()
        got = await b
        with pytest.raises(asyncio.CancelledError):
            await a
        await ms.stop()
        _idle(ms, pool)
        return got

    got = asyncio.run(main())
    assert got.batch_size == 2 and got.result["top_k"]


def test_bad_image_beside_good_ones(model_cache, photo):
    async def main():
        pool = PreprocessPool(2)
        ms = await _started(_server(model_cache, pool, max_delay_ms=200))
        futs = [_predict(ms, d)[1] for d in (photo, BAD, photo, photo)]
        out = await asyncio.gather(*futs, return_exceptions=True)
        await ms.stop()
        _idle(ms, pool)
        return out

    out = asyncio.run(main())
    good = [r for r in out if not isinstance(r, BaseException)]
    bad = [r for r in out if isinstance(r, BaseException)]
    assert len(good) == 3 and len(bad) == 1
    assert isinstance(bad[0], RequestError) and bad[0].status == 400
    assert {p.batch_size for p in good} == {3}  # the bad one left no hole in the batch


def test_a_bad_parameter_is_a_400_before_any_work(model_cache):
    pool = PreprocessPool(1)
    ms = _server(model_cache, pool)
    assert ms.parse_params({"top_k": "3"}) == {"top_k": 3}
    for given, needle in (
        ({"top_k": "0"}, "top_k must be in [1, 1000]"),
        ({"top_k": "x"}, "top_k must be an integer"),
        ({"nope": "1"}, "unknown parameter 'nope'; known: top_k"),
    ):
        with pytest.raises(RequestError, match=needle.replace("[", r"\[")) as e:
            ms.parse_params(given)
        assert e.value.status == 400
    described = ms.describe()["parameters"]
    assert described == [
        {"name": "top_k", "type": "int", "default": 5, "lo": 1, "hi": 1000,
         "help": "labels to return"}
    ]  # fmt: skip


# --- the pool's one submit call ---------------------------------------------------------------
class _Timed:
    def __init__(self, stages):
        self.stages = stages


def test_submit_charges_queue_then_the_stage_or_the_results_stages():
    async def main():
        pool = PreprocessPool(1)
        t = Trace()
        await pool.submit(t, time.sleep, 0.05, deadline=time.perf_counter() + 5, stage="encode")
        t2 = Trace()
        out = await pool.submit(
            t2, lambda: _Timed({"decode": 0.01, "resize": 0.02}), deadline=time.perf_counter() + 5
        )
        return t, t2, out

    t, t2, out = asyncio.run(main())
    assert set(t.stages) == {"queue", "encode"} and t.stages["encode"] >= 0.05
    assert t2.stages == {"queue": t2.stages["queue"], "decode": 0.01, "resize": 0.02}


def test_submit_gives_back_what_it_claimed_when_the_work_fails():
    released = []

    def boom(claimed):
        raise ValueError(f"bad {claimed}")

    async def main():
        pool = PreprocessPool(1)
        t = Trace()
        with pytest.raises(ValueError, match="bad slot-1"):
            await pool.submit(
                t, boom, deadline=time.perf_counter() + 5,
                claim=lambda: "slot-1", release=released.append, fail_stage="decode",
            )  # fmt: skip
        await asyncio.sleep(0)
        return pool, t

    pool, t = asyncio.run(main())
    assert released == ["slot-1"] and "decode" in t.stages
    assert pool.semaphore._value == 1


def test_submit_cancelled_releases_only_after_the_thread_is_done():
    released: list[str] = []
    gate, running = threading.Event(), threading.Event()

    async def main():
        pool = PreprocessPool(1)
        task = asyncio.ensure_future(
            pool.submit(
                Trace(),
                lambda c: (running.set(), gate.wait(5)),
                deadline=time.perf_counter() + 5,
                claim=lambda: "slot",
                release=released.append,
            )  # fmt: skip
        )
        await _until(running.is_set)  # the thread is writing
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        during = (list(released), pool.semaphore._value)  # the thread still writes
        gate.set()
        for _ in range(100):
            if released:
                break
            await asyncio.sleep(0.01)
        return during, pool.semaphore._value

    (during_released, during_free), after_free = asyncio.run(main())
    assert during_released == [] and during_free == 0
    assert released == ["slot"] and after_free == 1


def test_admission_counts_and_computes_retry_after():
    adm = Admission("model m", max_queue=1, parallel=1)
    with adm.admit():
        assert adm.inflight == 1
        with pytest.raises(Overloaded, match=r"model m has 1 requests in flight \(max_queue=1\)"):
            with adm.admit():
                pass
    assert adm.inflight == 0


# --- admission by expected wait ---------------------------------------------------------------
def test_service_rate_counts_only_busy_time():
    r = ServiceRate()
    r.completed(0.0, 4, busy_after=True)  # the first completion only starts the clock
    assert r.per_s is None
    r.completed(1.0, 4, busy_after=True)
    assert r.per_s == pytest.approx(4.0)
    r.note(False)  # idle for a while: that gap says nothing about the rate
    r.completed(11.0, 4, busy_after=True)
    assert r.per_s == pytest.approx(4.0)
    r.completed(11.5, 4, busy_after=False)  # 4 in 0.5 s: the average moves towards 8/s
    assert 4.0 < r.per_s < 8.0
    r.completed(20.0, 4, busy_after=True)  # idle since the last one: not counted
    assert r.samples == 2


def test_admission_refuses_by_expected_wait_and_by_deadline():
    now = [0.0]
    adm = Admission("model m", max_queue=100, max_wait_s=None, round_rows=4,
                    clock=lambda: now[0])  # fmt: skip
    with contextlib.ExitStack() as held:
        for _ in range(10):  # no rate yet: only the count limit
            held.enter_context(adm.admit(deadline=0.01))
        assert adm.expected_wait_s() is None and adm.wait_limit_s() is None
        adm.observe_batch(4, 0.5, end=0.5)
        adm.observe_batch(4, 0.5, end=1.0)  # 8 requests/s, 0.5 s a batch
        now[0] = 1.0
        assert adm.rate.per_s == pytest.approx(8.0)
        assert adm.wait_limit_s() == pytest.approx(AUTO_WAIT_ROUNDS * 4 / 8.0)
        assert adm.expected_wait_s() == pytest.approx(10 / 8.0 + 0.5)
        # the automatic limit refuses only while the queue grows (arrivals outrunning
        # service: tests/serving/test_admission.py simulates how that is told)
        adm.growth.growing = True
        limit = round(AUTO_WAIT_ROUNDS * 4 / 8.0 * 1000)
        with pytest.raises(Overloaded, match=f"expected wait 1750 ms .* max_queue_wait_ms={limit}"):
            with adm.admit():
                pass
        with pytest.raises(Overloaded, match="exceeds its deadline in 800 ms") as e:
            with adm.admit(deadline=1.8):  # sooner than the wait limit: the deadline binds
                pass
        assert e.value.detail["limit_ms"] == 800.0 and e.value.retry_after_s == 1
        adm.max_wait_s = 0.0  # off: only the deadline counts
        with adm.admit(deadline=60.0):
            assert adm.inflight == 11
        adm.max_wait_s = 0.25  # 1.5 s past it: retry in 2 s
        with pytest.raises(Overloaded) as e:
            with adm.admit():
                pass
        assert e.value.retry_after_s == 2 and e.value.detail["queue"] == 10
    assert adm.inflight == 0
    with adm.admit():  # nobody ahead: never refused by time
        pass


def test_admission_without_batches_measures_requests_leaving():
    now = [0.0]
    adm = Admission("pipeline p", max_queue=100, max_wait_s=1.0, clock=lambda: now[0])
    held = [adm.admit() for _ in range(8)]
    for cm in held:
        cm.__enter__()
    for i, cm in enumerate(held[:4]):  # one leaves every 250 ms while others wait: 4/s
        now[0] = 0.25 * (i + 1)
        cm.__exit__(None, None, None)
    assert adm.rate.per_s == pytest.approx(4.0)
    # 4 ahead at 4/s, plus its own 1/4 s: 1.25 s > 1 s
    with pytest.raises(Overloaded, match="expected wait 1250 ms"):
        with adm.admit():
            pass
    for i, cm in enumerate(held[4:]):
        now[0] = 1.25 + 0.25 * i
        cm.__exit__(None, None, None)
    now[0] = 100.0  # idle for 99 s, then busy again: the idle time is not counted
    with adm.admit():
        now[0] = 100.1
    assert adm.rate.per_s == pytest.approx(4.0)


def test_the_automatic_wait_limit_counts_fewer_rounds_on_a_cpu():
    from cvserve.config import ModelConfig
    from cvserve.serving.core import CPU_WAIT_ROUNDS
    from cvserve.serving.model import on_cpu

    assert on_cpu(ModelConfig("m"))
    assert not on_cpu(ModelConfig("m", runtime="simulated", sim_profile="1:5"))
    assert not on_cpu(ModelConfig("m", device="cuda"))
    now = [0.0]
    adm = Admission("model m", max_queue=100, max_wait_s=None, round_rows=4,
                    rounds=CPU_WAIT_ROUNDS, clock=lambda: now[0])  # fmt: skip
    adm.observe_batch(4, 0.5, end=0.5)
    adm.observe_batch(4, 0.5, end=1.0)  # 8 requests/s
    assert adm.wait_limit_s() == pytest.approx(CPU_WAIT_ROUNDS * 4 / 8.0)
    assert adm.describe()["auto_rounds"] == CPU_WAIT_ROUNDS < AUTO_WAIT_ROUNDS

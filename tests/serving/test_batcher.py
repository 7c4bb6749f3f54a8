"""The dynamic batcher's contract, with a real numpy 'model' gated by events, not sleeps."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cvserve.config import BatchConfig
from cvserve.errors import RequestError
from cvserve.serving.batcher import Batcher
from cvserve.serving.errors import InferenceFailed


class RowSums:
    """A model whose output row depends only on its input row: y = sum(x) * 2."""

    input_name = "x"
    input_dtype = "float32"
    output_names = ["y"]

    def __init__(self, gate: threading.Event | None = None, fail_first: bool = False):
        self.gate = gate
        self.fail_first = fail_first
        self.batches: list[int] = []
        self.started = threading.Event()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.batches.append(batch.shape[0])
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("boom")
        return [batch.reshape(batch.shape[0], -1).sum(axis=1) * 2]


def _batcher(rt, **cfg) -> Batcher:
    b = Batcher([rt], (2, 2), "float32", BatchConfig(**cfg))
    b.start()
    return b


def _submit(b: Batcher, value: float) -> asyncio.Future:
    slot = b.reserve()
    slot.view[...] = value
    return b.commit(slot)


def _value(fut_result) -> float:
    rows, _info = fut_result
    return float(rows[0])


def test_full_batch_dispatches_at_once():
    async def main():
        rt = RowSums()
        b = _batcher(rt, max_batch_size=4, max_delay_ms=60_000)
        b._upstream = 100  # others are on their way: only a full batch may go early
        futs = [_submit(b, v) for v in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        b.stop()
        assert [_value(r) for r in results] == [v * 4 * 2 for v in range(4)]
        assert rt.batches == [4]
        assert {r[1].size for r in results} == {4}

    asyncio.run(main())


def test_partial_batch_waits_for_the_delay():
    async def main():
        rt = RowSums()
        b = _batcher(rt, max_batch_size=8, max_delay_ms=50)
        b._upstream = 100
        t0 = time.perf_counter()
        futs = [_submit(b, 1.0), _submit(b, 2.0)]
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        waited = time.perf_counter() - t0
        b.stop()
        assert rt.batches == [2]
        assert waited >= 0.045  # the batch was held open for its delay
        assert [_value(r) for r in results] == [8.0, 16.0]

    asyncio.run(main())


def test_nobody_upstream_means_no_wait():
    async def main():
        rt = RowSums()
        b = _batcher(rt, max_batch_size=8, max_delay_ms=60_000)
        b._upstream = 0
        r = await asyncio.wait_for(_submit(b, 3.0), 10)  # a 60 s delay would time out
        b.stop()
        assert _value(r) == 24.0 and rt.batches == [1]

    asyncio.run(main())


def test_batch_grows_while_the_instance_is_busy():
    async def main():
        gate = threading.Event()
        rt = RowSums(gate)
        b = _batcher(rt, max_batch_size=8, max_delay_ms=0)
        b._upstream = 0
        first = _submit(b, 1.0)
        await asyncio.get_running_loop().run_in_executor(None, rt.started.wait, 10)
        later = [_submit(b, float(v)) for v in range(5)]
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 10)
        b.stop()
        assert rt.batches == [1, 5]

    asyncio.run(main())


def test_holes_are_squeezed_out():
    async def main():
        rt = RowSums()
        b = _batcher(rt, max_batch_size=3, max_delay_ms=60_000)
        b._upstream = 100
        s0, s1, s2 = b.reserve(), b.reserve(), b.reserve()
        s0.view[...] = 1.0
        s2.view[...] = 5.0
        f0 = b.commit(s0)
        b.release(s1)  # a bad image: never written
        f2 = b.commit(s2)
        r0, r2 = await asyncio.wait_for(asyncio.gather(f0, f2), 10)
        b.stop()
        assert rt.batches == [2]
        assert (_value(r0), _value(r2)) == (8.0, 40.0)

    asyncio.run(main())


def test_cancelled_row_does_not_hurt_its_batch_mates():
    async def main():
        gate = threading.Event()
        rt = RowSums(gate)
        b = _batcher(rt, max_batch_size=2, max_delay_ms=60_000)
        b._upstream = 100
        f0, f1 = _submit(b, 1.0), _submit(b, 2.0)
        f0.cancel()
        gate.set()
        r1 = await asyncio.wait_for(f1, 10)
        b.stop()
        assert _value(r1) == 16.0

    asyncio.run(main())


def test_failed_batch_fails_its_rows_and_the_worker_lives_on():
    async def main():
        rt = RowSums(fail_first=True)
        b = _batcher(rt, max_batch_size=2, max_delay_ms=0)
        b._upstream = 0
        with pytest.raises(InferenceFailed):
            await asyncio.wait_for(_submit(b, 1.0), 10)
        r = await asyncio.wait_for(_submit(b, 2.0), 10)
        b.stop()
        assert _value(r) == 16.0

    asyncio.run(main())


def test_config_is_validated():
    with pytest.raises(ValueError):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchConfig(max_delay_ms=-1)


# -- failures stay with their row ---------------------------------------------------------
POISON = -7.0  # a row whose first value is this fails the runtime call it rides in


class PoisonSums(RowSums):
    """RowSums that fails every call holding a row marked ``POISON`` (``error`` says how),
    or every call at all (``broken``). Records each call's row values."""

    def __init__(self, gate=None, error: type[Exception] = RuntimeError, broken=False):
        super().__init__(gate)
        self.error = error
        self.broken = broken
        self.calls: list[list[float]] = []

    def run(self, batch):
        self.calls.append([float(r.reshape(-1)[0]) for r in batch])
        if self.broken:
            raise RuntimeError("session is broken")
        if any(r.reshape(-1)[0] == POISON for r in batch):
            raise self.error("cannot run a row of -7")
        return super().run(batch)


async def _eight_with(rt, values, **cfg):
    """Submit ``values`` as one batch (held until all are in); results or exceptions."""
    gate = rt.gate
    b = _batcher(rt, max_batch_size=len(values), max_delay_ms=60_000, **cfg)
    b._upstream = 100  # only the full batch goes
    observed = []
    b.on_batch = observed.append
    futs = [_submit(b, v) for v in values]
    if gate is not None:
        gate.set()
    got = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 10)
    b.stop()
    return got, observed


@pytest.mark.parametrize("where", [0, 3, 7])
def test_a_poison_row_fails_alone_and_its_seven_batch_mates_are_answered(where):
    async def main():
        rt = PoisonSums(threading.Event())
        values = [float(v + 1) for v in range(8)]
        values[where] = POISON
        got, observed = await _eight_with(rt, values)
        for i, (v, r) in enumerate(zip(values, got, strict=True)):
            if i == where:
                assert isinstance(r, InferenceFailed) and r.status == 500
                assert "failed on this input" in str(r) and "cannot run a row of -7" in str(r)
            else:
                assert _value(r) == v * 4 * 2  # its own row's answer, not a neighbour's
        # three levels of two halves (log2(8)), never each row alone; the poison ran
        # alone once, so it is named for what it did itself
        assert len(rt.calls) == 1 + 6
        assert rt.calls.count([POISON]) == 1
        # metrics and admission saw only calls that ran, with their own sizes
        assert sorted(i.size for i in observed) == sorted(
            len(c) for c in rt.calls if POISON not in c
        )
        assert sum(i.size for i in observed) == 7

    asyncio.run(main())


def test_answered_rows_count_the_reruns_in_their_infer_time():
    async def main():
        rt = PoisonSums(threading.Event())
        values = [POISON, 2.0, 3.0, 4.0]
        got, observed = await _eight_with(rt, values)
        infos = [r[1] for r in got[1:]]
        first_call_start = min(i.infer_start for i in infos)
        # every answered row's infer starts at the failed call, not at its rerun
        assert all(i.infer_start == first_call_start for i in infos)
        for i in infos:  # ... and ends with the rerun that answered it
            assert any(o.infer_end == i.infer_end and o.size == i.size for o in observed)
            assert i.infer_start < min(o.infer_start for o in observed)

    asyncio.run(main())


def test_an_invalid_input_error_is_a_400_naming_the_row():
    async def main():
        rt = PoisonSums(threading.Event(), error=ValueError)
        got, _ = await _eight_with(rt, [1.0, POISON, 3.0, 4.0])
        bad = got[1]
        assert isinstance(bad, RequestError) and bad.status == 400
        assert "the runtime failed on this input" in str(bad)
        assert [_value(r) for i, r in enumerate(got) if i != 1] == [8.0, 24.0, 32.0]

    asyncio.run(main())


def test_a_runtime_that_fails_everything_fails_the_batch_in_three_calls():
    async def main():
        rt = PoisonSums(threading.Event(), broken=True)
        got, observed = await _eight_with(rt, [float(v) for v in range(8)])
        assert all(isinstance(r, InferenceFailed) for r in got)
        assert "session is broken" in str(got[0])
        assert [len(c) for c in rt.calls] == [8, 4, 4]  # the batch, then its two halves
        assert observed == []  # no failed call's time reaches admission or metrics
        # the instance lives on: the next batch runs
        rt.broken = False
        b = _batcher(rt, max_batch_size=1, max_delay_ms=0)
        b._upstream = 0
        assert _value(await asyncio.wait_for(_submit(b, 1.0), 10)) == 8.0
        b.stop()

    asyncio.run(main())


def test_two_poison_rows_in_one_half_fail_that_half_only():
    async def main():
        rt = PoisonSums(threading.Event())
        values = [POISON, 2.0, POISON, 4.0, 5.0, 6.0, 7.0, 8.0]
        got, _ = await _eight_with(rt, values)
        # rows 0..3 hold both poisons: their halves [0,1] and [2,3] both fail, the search
        # stops there (bounded), and rows 4..7 are answered
        assert all(isinstance(r, InferenceFailed) for r in got[:4])
        assert [_value(r) for r in got[4:]] == [v * 8 for v in values[4:]]
        assert len(rt.calls) == 1 + 2 + 2

    asyncio.run(main())


def test_rows_written_on_the_gpu_are_not_rerun_elsewhere():
    """A rerun moves rows to the buffer's head; a row whose pixels are in a device buffer
    (a row mark) would then read another row's pixels: such a batch fails whole."""
    from types import SimpleNamespace

    from cvserve.runtime.device_rows import mark_row

    async def main():
        rt = PoisonSums(threading.Event())
        rt.buffers = SimpleNamespace(magic=b"\x01" * 8)
        b = _batcher(rt, max_batch_size=4, max_delay_ms=60_000)
        b._upstream = 100
        slots = [b.reserve() for _ in range(4)]
        for s, v in zip(slots, [POISON, 2.0, 3.0, 4.0], strict=True):
            s.view[...] = v
        mark_row(slots[3].view, 3, rt.buffers.magic)
        futs = [b.commit(s) for s in slots]
        rt.gate.set()
        got = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 10)
        b.stop()
        assert all(isinstance(r, InferenceFailed) for r in got)
        assert len(rt.calls) == 1

    asyncio.run(main())

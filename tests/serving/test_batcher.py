"""The dynamic batcher's contract, with a real numpy 'model' gated by events, not sleeps."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cvserve.config import BatchConfig
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

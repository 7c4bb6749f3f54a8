"""The broker contract, run against every implementation (see ``cvserve.brokers.base``)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cvserve.brokers import BrokerFull, MalformedMessage, Message

from .conftest import run


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 17, 5)).astype(np.float32)
    f32[0, 0, :3] = [np.nan, -0.0, np.inf]
    return {
        "crop": rng.integers(0, 256, (48, 32, 3), dtype=np.uint8),
        "tensor": f32,
        "half": rng.standard_normal((2, 3)).astype(np.float16),
        "f64": np.float64(np.pi) * np.ones((), np.float64),
        "i64": np.array([-(2**62), 0, 2**62], np.int64),
        "u16": np.arange(7, dtype=np.uint16),
        "mask": np.array([[True, False], [False, True]]),
        "c64": np.array([1 + 2j, -3.5j], np.complex64),
        "empty": np.zeros((0, 4), np.int32),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
    }


def test_round_trip_is_bit_exact_with_headers(make_broker):
    arrays = _arrays()
    headers = {"model": "crnn", "crop": 3, "scale": 0.25, "rotated": False}
    sent = Message("req-1", index=3, headers=headers, arrays=arrays, reply_to="replies.x")

    async def main():
        async with make_broker() as b:
            before = time.time()
            entry_id = await b.publish("work", sent)
            [d] = await b.consume("work", "g", "c1", count=10)
            await b.ack("work", "g", [d.id])
            return before, entry_id, d

    before, entry_id, d = run(main())
    got = d.message
    assert d.id == entry_id and d.topic == "work" and not d.redelivered
    assert (got.request_id, got.index, got.reply_to, got.id) == ("req-1", 3, "replies.x", sent.id)
    assert got.headers == headers
    assert [type(v) for v in got.headers.values()] == [str, int, float, bool]
    assert list(got.arrays) == list(arrays)
    for name, want in arrays.items():
        have = got.arrays[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert have.tobytes() == want.tobytes(), name  # NaN, -0.0 and byte order too
    assert before <= got.published_at <= d.consumed_at
    assert d.broker_s == d.consumed_at - got.published_at
    assert sent.published_at is None  # the caller's message is not modified


def test_delivered_arrays_are_read_only(make_broker):
    async def main():
        async with make_broker() as b:
            await b.publish("work", Message("r", arrays={"x": np.zeros(3)}))
            [d] = await b.consume("work", "g", "c")
            return d.message.arrays["x"]

    arr = run(main())
    with pytest.raises(ValueError):
        arr[0] = 1.0


def test_order_within_a_topic_is_preserved(make_broker):
    async def main():
        async with make_broker() as b:
            ids = [await b.publish("work", Message(f"r{i}", index=i)) for i in range(20)]
            got = []
            while batch := await b.consume("work", "g", "c", count=7):
                got += batch
                await b.ack("work", "g", [d.id for d in batch])
            return ids, got

    ids, got = run(main())
    assert [d.id for d in got] == ids
    assert [d.message.index for d in got] == list(range(20))


def test_publish_many_keeps_order_and_respects_maxlen(make_broker):
    async def main():
        async with make_broker(maxlen=5, publish_timeout=0.2) as b:
            fan = [Message("r", index=i, arrays={"x": np.full(4, i, np.int16)}) for i in range(4)]
            ids = await b.publish_many("work", fan)
            got = await b.consume("work", "g", "c", count=10)
            # Room for 1 more of 5: the next fan-out of 3 falls back to one at a time,
            # publishes one, then waits for room and reports the topic full.
            with pytest.raises(BrokerFull):
                await b.publish_many("work", [Message("s", index=i) for i in range(3)])
            return ids, got, await b.length("work")

    ids, got, length = run(main())
    assert [d.id for d in got] == ids
    assert [int(d.message.arrays["x"][0]) for d in got] == [0, 1, 2, 3]
    assert length == 5  # 4 unacknowledged + 1: nothing trimmed, nothing over maxlen


def test_consume_without_block_returns_at_once_when_empty(make_broker):
    async def main():
        async with make_broker() as b:
            return await b.consume("work", "g", "c", count=5, block_ms=0)

    assert run(main()) == []


def test_blocked_consumer_wakes_on_publish(make_broker):
    async def main():
        async with make_broker() as b:
            await b.create_group("work", "g")
            waiter = asyncio.create_task(b.consume("work", "g", "c", count=5, block_ms=60_000))
            await asyncio.sleep(0.05)  # let it block (either way it must get the message)
            await b.publish("work", Message("late"))
            return await asyncio.wait_for(waiter, 10)

    [d] = run(main())
    assert d.message.request_id == "late"


def test_two_consumers_of_a_group_share_the_load(make_broker):
    n = 30

    async def main():
        async with make_broker() as b:
            for i in range(n):
                await b.publish("work", Message(f"r{i}"))
            got: dict[str, list[str]] = {"c1": [], "c2": []}
            while True:
                progressed = False
                for c in got:
                    batch = await b.consume("work", "g", c, count=4)
                    got[c] += [d.message.request_id for d in batch]
                    await b.ack("work", "g", [d.id for d in batch])
                    progressed |= bool(batch)
                if not progressed:
                    return got, await b.length("work")

    got, left = run(main())
    assert got["c1"] and got["c2"]
    assert not set(got["c1"]) & set(got["c2"])
    assert sorted(got["c1"] + got["c2"]) == sorted(f"r{i}" for i in range(n))
    assert left == 0


def test_concurrent_consumers_never_get_the_same_message(make_broker):
    n = 40

    async def main():
        async with make_broker() as b:
            await b.create_group("work", "g")
            seen: list[str] = []

            async def worker(name: str) -> list[str]:
                mine = []
                while len(seen) < n:
                    batch = await b.consume("work", "g", name, count=3, block_ms=50)
                    mine += [d.message.request_id for d in batch]
                    seen.extend(d.message.request_id for d in batch)
                    await b.ack("work", "g", [d.id for d in batch])
                return mine

            tasks = [asyncio.create_task(worker(f"c{k}")) for k in range(3)]
            for i in range(n):
                await b.publish("work", Message(f"r{i}"))
            return await asyncio.gather(*tasks)

    results = run(main())
    flat = [r for mine in results for r in mine]
    assert sorted(flat) == sorted(f"r{i}" for i in range(n))  # each exactly once


def test_every_group_gets_every_message(make_broker):
    async def main():
        async with make_broker() as b:
            await b.create_group("work", "ocr")
            await b.create_group("work", "audit")
            for i in range(5):
                await b.publish("work", Message(f"r{i}"))
            out = {}
            for g in ("ocr", "audit"):
                batch = await b.consume("work", g, "c", count=10)
                out[g] = [d.message.request_id for d in batch]
            return out

    out = run(main())
    assert out["ocr"] == out["audit"] == [f"r{i}" for i in range(5)]


def test_ack_counts_pending_once_and_drops_finished_entries(make_broker):
    async def main():
        async with make_broker() as b:
            for i in range(3):
                await b.publish("work", Message(f"r{i}"))
            batch = await b.consume("work", "g", "c", count=3)
            ids = [d.id for d in batch]
            pending = await b.pending("work", "g")
            first = await b.ack("work", "g", ids)
            again = await b.ack("work", "g", ids)
            return pending, first, again, await b.pending("work", "g"), await b.length("work")

    assert run(main()) == (3, 3, 0, 0, 0)


def test_unacked_work_of_a_dead_consumer_is_reclaimed_once(make_broker):
    async def main():
        async with make_broker() as b:
            for i in range(4):
                await b.publish("work", Message(f"r{i}", arrays={"x": np.full(3, i)}))
            taken = await b.consume("work", "g", "dead", count=3)
            await b.ack("work", "g", [taken[0].id])  # it finished one, then died
            too_soon = await b.reclaim("work", "g", "alive", min_idle_ms=60_000)
            reclaimed = []
            for _ in range(200):  # the entries must sit idle for min_idle_ms first
                reclaimed = await b.reclaim("work", "g", "alive", min_idle_ms=100)
                if reclaimed:
                    break
                await asyncio.sleep(0.02)
            await b.ack("work", "g", [d.id for d in reclaimed])
            rest = await b.consume("work", "g", "alive", count=10)
            await b.ack("work", "g", [d.id for d in rest])
            after = await b.reclaim("work", "g", "alive", min_idle_ms=0)
            again = await b.consume("work", "g", "alive", count=10)
            return taken, too_soon, reclaimed, rest, after, again, await b.length("work")

    taken, too_soon, reclaimed, rest, after, again, length = run(main())
    assert too_soon == []
    assert [d.id for d in reclaimed] == [d.id for d in taken[1:]]
    assert all(d.redelivered for d in reclaimed)
    assert [d.message.request_id for d in reclaimed] == ["r1", "r2"]
    assert [int(d.message.arrays["x"][0]) for d in reclaimed] == [1, 2]
    assert [d.message.request_id for d in rest] == ["r3"]
    assert after == [] and again == [] and length == 0


def test_backpressure_blocks_then_raises_and_resumes_after_ack(make_broker):
    n = 4

    async def main():
        async with make_broker(maxlen=n, publish_timeout=30) as b:
            for i in range(n):
                await b.publish("work", Message(f"r{i}"))
            with pytest.raises(BrokerFull) as full:
                await b.publish("work", Message("extra"), timeout=0.1)
            # Consumed but not acknowledged is still unfinished: still no room.
            batch = await b.consume("work", "g", "c", count=2)
            with pytest.raises(BrokerFull):
                await b.publish("work", Message("extra"), timeout=0.1)
            blocked = asyncio.create_task(b.publish("work", Message("extra")))
            await asyncio.sleep(0.05)
            assert not blocked.done()
            await b.ack("work", "g", [batch[0].id])
            await asyncio.wait_for(blocked, 10)
            length = await b.length("work")
            await b.ack("work", "g", [batch[1].id])
            rest = await b.consume("work", "g", "c", count=10)
            return full.value, length, [d.message.request_id for d in batch + rest]

    err, length, delivered = run(main())
    assert (err.topic, err.maxlen, err.timeout) == ("work", n, 0.1)
    assert length == n
    assert delivered == ["r0", "r1", "r2", "r3", "extra"]  # nothing was trimmed


def test_work_unfinished_by_one_group_is_never_trimmed(make_broker):
    async def main():
        async with make_broker(maxlen=3) as b:
            await b.create_group("work", "fast")
            await b.create_group("work", "slow")
            for i in range(3):
                await b.publish("work", Message(f"r{i}", arrays={"x": np.arange(i + 1)}))
            fast = await b.consume("work", "fast", "c", count=10)
            await b.ack("work", "fast", [d.id for d in fast])
            held = await b.length("work")
            with pytest.raises(BrokerFull):
                await b.publish("work", Message("extra"), timeout=0.05)
            slow = await b.consume("work", "slow", "c", count=10)
            await b.ack("work", "slow", [d.id for d in slow[1:]])  # out of order
            held_after_partial = await b.length("work")
            await b.ack("work", "slow", [slow[0].id])
            return held, held_after_partial, slow, await b.length("work")

    held, partial, slow, final = run(main())
    assert held == 3
    assert partial == 3  # r0 is unfinished, so nothing after it is trimmed yet
    assert [d.message.arrays["x"].tolist() for d in slow] == [[0], [0, 1], [0, 1, 2]]
    assert final == 0


def test_publish_rejects_what_cannot_travel(make_broker):
    async def main():
        async with make_broker() as b:
            with pytest.raises(MalformedMessage):
                await b.publish("work", Message("r", arrays={"x": np.array([{}], object)}))
            with pytest.raises(MalformedMessage):
                await b.publish("work", Message("r", headers={"x": [1, 2]}))  # type: ignore[dict-item]
            return await b.length("work")

    assert run(main()) == 0


def test_delete_topic_drops_entries_and_groups(make_broker):
    async def main():
        async with make_broker() as b:
            await b.publish("work", Message("r0"))
            await b.consume("work", "g", "c")
            await b.delete_topic("work")
            length, pending = await b.length("work"), await b.pending("work", "g")
            await b.publish("work", Message("r1"))
            got = await b.consume("work", "g", "c")  # the group is made again
            return length, pending, [d.message.request_id for d in got]

    assert run(main()) == (0, 0, ["r1"])

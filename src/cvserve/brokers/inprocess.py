"""The default broker: topics in this process's memory, no server, same semantics.

It models a Redis stream on purpose (entry ids, per-group last-delivered id and pending
list, the same trimming rule), so code that passes the shared suite here behaves the same
against Redis. Messages are not encoded: arrays pass by reference as read-only views (do
not write into an array after publishing it). Use one broker from one event loop.

Dead letters are kept in memory beside their topic (listed by ``dead_letters``, not a
topic to consume). Reply topics need no expiry and the epoch never changes: everything
lives and dies with this one process.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable

import numpy as np

from .base import DEFAULT_DEAD_MAXLEN, DEFAULT_MAXLEN, DEFAULT_PUBLISH_TIMEOUT, Broker
from .codec import validate
from .errors import BrokerError, BrokerFull
from .message import DeadLetter, Delivery, Message


class _Pending:
    __slots__ = ("consumer", "delivered", "count")

    def __init__(self, consumer: str, delivered: float) -> None:
        self.consumer = consumer
        self.delivered = delivered  # time.monotonic() of the last delivery
        self.count = 1  # deliveries so far


class _Group:
    __slots__ = ("last", "pending")

    def __init__(self) -> None:
        self.last = 0  # last delivered entry id; 0: starts from the oldest held entry
        # Entry ids in delivery order, which is id order: the oldest pending comes first.
        self.pending: dict[int, _Pending] = {}


class _Topic:
    __slots__ = ("entries", "next_id", "groups", "arrivals", "room")

    def __init__(self) -> None:
        self.entries: dict[int, Message] = {}
        self.next_id = 1
        self.groups: dict[str, _Group] = {}
        self.arrivals: list[asyncio.Future[None]] = []  # consumers blocked for messages
        self.room: list[asyncio.Future[None]] = []  # publishers blocked for room


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)
    waiters.clear()


async def _wait(waiters: list[asyncio.Future[None]], timeout: float) -> None:
    fut = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        async with asyncio.timeout(timeout):
            await fut
    except TimeoutError:
        pass
    finally:
        if fut in waiters:
            waiters.remove(fut)


def _read_only(value: np.ndarray) -> np.ndarray:
    view = np.asarray(value).view()
    view.flags.writeable = False
    return view


def _copy(msg: Message) -> Message:
    # A fresh header dict per delivery: one consumer's edits never reach another's.
    return Message(
        request_id=msg.request_id,
        index=msg.index,
        headers=dict(msg.headers),
        arrays=dict(msg.arrays),
        reply_to=msg.reply_to,
        id=msg.id,
        published_at=msg.published_at,
    )


class InProcessBroker(Broker):
    """Topics as in-memory logs with consumer groups; no server, no encoding."""

    def __init__(
        self, *, maxlen: int = DEFAULT_MAXLEN, publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self.publish_timeout = publish_timeout
        self._topics: dict[str, _Topic] = {}
        self._dead: dict[str, deque[DeadLetter]] = {}
        self._dead_ids = 0
        self._closed = False

    @property
    def safe_url(self) -> str:
        return "inprocess://"

    def _topic(self, name: str) -> _Topic:
        if self._closed:
            raise BrokerError("broker is closed")
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic()
        return topic

    async def publish(self, topic: str, message: Message, *, timeout: float | None = None) -> str:
        validate(message)
        t = self._topic(topic)
        if len(t.entries) >= self.maxlen:
            wait = self.publish_timeout if timeout is None else timeout
            deadline = time.monotonic() + wait
            while len(t.entries) >= self.maxlen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerFull(topic, self.maxlen, wait)
                await _wait(t.room, remaining)
                t = self._topic(topic)
        stored = Message(
            request_id=message.request_id,
            index=message.index,
            headers=dict(message.headers),
            arrays={k: _read_only(v) for k, v in message.arrays.items()},
            reply_to=message.reply_to,
            id=message.id,
            published_at=time.time(),
        )
        entry_id = t.next_id
        t.next_id += 1
        t.entries[entry_id] = stored
        _wake(t.arrivals)
        return str(entry_id)

    async def withdraw(self, topic: str, ids: Iterable[str]) -> int:
        t = self._topics.get(topic)
        if t is None:
            return 0
        gone = []
        for s in ids:
            try:
                entry_id = int(s)
            except ValueError:
                continue
            if entry_id in t.entries and not any(entry_id in g.pending for g in t.groups.values()):
                del t.entries[entry_id]
                gone.append(entry_id)
        if gone:
            _wake(t.room)
        return len(gone)

    async def publish_reply(
        self, topic: str, message: Message, *, timeout: float | None = None
    ) -> str | None:
        if self._closed or topic not in self._topics:
            return None
        return await self.publish(topic, message, timeout=timeout)

    def _group(self, t: _Topic, group: str) -> _Group:
        g = t.groups.get(group)
        if g is None:
            g = t.groups[group] = _Group()
        return g

    async def create_group(self, topic: str, group: str) -> None:
        self._group(self._topic(topic), group)

    async def consume(
        self, topic: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        # Always suspend once, like a network call would: a consume loop that always
        # finds work must still let other tasks run and a cancellation land.
        await asyncio.sleep(0)
        t = self._topic(topic)
        g = self._group(t, group)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            out = self._take(topic, t, g, consumer, count)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            await _wait(t.arrivals, remaining)

    def _take(self, name: str, t: _Topic, g: _Group, consumer: str, count: int) -> list[Delivery]:
        entry_id = g.last + 1
        if t.entries:
            entry_id = max(entry_id, next(iter(t.entries)))
        out: list[Delivery] = []
        now, wall = time.monotonic(), time.time()
        while entry_id < t.next_id and len(out) < count:
            msg = t.entries.get(entry_id)
            if msg is not None:
                g.pending[entry_id] = _Pending(consumer, now)
                out.append(Delivery(str(entry_id), name, _copy(msg), wall))
            g.last = entry_id
            entry_id += 1
        return out

    async def ack(self, topic: str, group: str, ids: Iterable[str]) -> int:
        t = self._topic(topic)
        g = t.groups.get(group)
        if g is None:
            return 0
        done = []
        for s in ids:
            try:
                entry_id = int(s)
            except ValueError:
                continue
            if g.pending.pop(entry_id, None) is not None:
                done.append(entry_id)
        if done:
            self._trim(t, done)
        return len(done)

    def _trim(self, t: _Topic, done: list[int]) -> None:
        before = len(t.entries)
        if len(t.groups) == 1:
            for entry_id in done:
                t.entries.pop(entry_id, None)
        else:
            # Entries below every group's oldest unfinished one are finished by all groups.
            floor = min(
                next(iter(g.pending)) if g.pending else g.last + 1 for g in t.groups.values()
            )
            while t.entries:
                oldest = next(iter(t.entries))
                if oldest >= floor:
                    break
                del t.entries[oldest]
        if len(t.entries) < before:
            _wake(t.room)

    async def reclaim(
        self, topic: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 100
    ) -> list[Delivery]:
        t = self._topic(topic)
        g = t.groups.get(group)
        if g is None:
            return []
        now, wall = time.monotonic(), time.time()
        out: list[Delivery] = []
        gone = []
        for entry_id, p in g.pending.items():
            if len(out) >= count:
                break
            if (now - p.delivered) * 1000 < min_idle_ms:
                continue
            msg = t.entries.get(entry_id)
            if msg is None:
                gone.append(entry_id)
                continue
            p.consumer, p.delivered = consumer, now
            p.count += 1
            out.append(
                Delivery(
                    str(entry_id), topic, _copy(msg), wall, redelivered=True, deliveries=p.count
                )
            )
        for entry_id in gone:
            del g.pending[entry_id]
        return out

    async def touch(self, topic: str, group: str, consumer: str, ids: Iterable[str]) -> int:
        t = self._topics.get(topic)
        g = None if t is None else t.groups.get(group)
        if g is None:
            return 0
        now, n = time.monotonic(), 0
        for entry_id in ids:
            p = g.pending.get(int(entry_id))
            if p is not None and p.consumer == consumer:
                p.delivered = now
                n += 1
        return n

    async def dead_letter(
        self, delivery: Delivery, group: str, *, reason: str, consumer: str = ""
    ) -> str | None:
        t = self._topics.get(delivery.topic)
        g = None if t is None else t.groups.get(group)
        try:
            entry_id = int(delivery.id)
        except ValueError:
            return None
        if g is None or entry_id not in g.pending:
            return None
        count = g.pending[entry_id].count
        msg = t.entries.get(entry_id) if t is not None else None
        self._dead_ids += 1
        dead_id = str(self._dead_ids)
        kept = self._dead.setdefault(delivery.topic, deque(maxlen=DEFAULT_DEAD_MAXLEN))
        kept.append(
            DeadLetter(
                id=dead_id,
                topic=delivery.topic,
                entry=delivery.id,
                group=group,
                deliveries=count,
                reason=reason,
                dead_at=time.time(),
                consumer=consumer,
                message=None if msg is None else _copy(msg),
            )
        )
        await self.ack(delivery.topic, group, [delivery.id])
        return dead_id

    async def dead_letters(self, topic: str | None = None, *, count: int = 100) -> list[DeadLetter]:
        topics = sorted(self._dead) if topic is None else [topic]
        out: list[DeadLetter] = []
        for name in topics:
            kept = list(self._dead.get(name, ()))
            out += kept[-count:] if count > 0 else []
        return out

    async def length(self, topic: str) -> int:
        t = self._topics.get(topic)
        return 0 if t is None else len(t.entries)

    async def pending(self, topic: str, group: str) -> int:
        t = self._topics.get(topic)
        g = None if t is None else t.groups.get(group)
        return 0 if g is None else len(g.pending)

    async def delete_topic(self, topic: str) -> None:
        t = self._topics.pop(topic, None)
        if t is not None:
            _wake(t.arrivals)
            _wake(t.room)

    async def close(self) -> None:
        for t in self._topics.values():
            _wake(t.arrivals)
            _wake(t.room)
        self._topics.clear()
        self._closed = True

"""Redis Streams broker: a stream per topic, consumer groups, XAUTOCLAIM, bounded streams.

Each entry holds one field, ``m``: the message frame of ``codec`` (header + raw array
bytes). Lua scripts keep the bound exact and never drop unfinished work, since a
stream's own MAXLEN trims the oldest entries whether consumed or not:

- publish: ``XADD`` only while ``XLEN < maxlen``; otherwise the client waits and retries
  until its timeout (``BrokerFull``). A reply that finds no stream makes one that
  expires after ``reply_ttl`` (a dead server's stream lives that long after its last
  result; a live router that was racing a restart reads it, then keeps it alive).
- ack: ``XACK``, then drop what every group has finished: the acknowledged entries
  themselves (``XDEL``) when the stream has one group, else everything below the oldest
  entry that some group has not finished (``XTRIM MINID``).
- reclaim: ``XAUTOCLAIM``, and each entry's delivery count from ``XPENDING``.
- dead letter: copy the entry's fields to ``<topic>.dead`` (``XADD MAXLEN ~``) with the
  reason and delivery count, then acknowledge it as above; nothing when no longer pending.

The URL is redis-py's (``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS
with ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` ... in the
query, ``unix:///path.sock``) plus cvserve's own query parameters (``maxlen``,
``publish_timeout``, ``prefix``, ``call_timeout``, ``reply_ttl``, ``dead_maxlen``),
which redis-py never sees. Refused
credentials raise a ``BrokerError`` that says so at once (no retrying); the password is
never logged (``safe_url``).

``epoch`` is the server's ``run_id`` (it changes on a restart and on a failover to
another server) and a marker key that every broker sharing the server sets if absent (it
disappears with the data: a restart without persistence, ``FLUSHALL``).

Connection failures raise ``BrokerUnavailable`` quickly (a deadline on every call, one
immediate retry on a fresh connection); the connection pool reconnects by itself on a
later call, and groups lost with a restarted server's data are created again.

The deadlines are ``asyncio.timeout`` around each call, not redis-py's ``socket_timeout``:
with a socket timeout, redis-py writes through ``asyncio.wait_for``, which on Python 3.11
loses a cancellation that lands as the write completes (the task then runs on, and a
``close`` that cancels a consume loop hangs).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from .base import (
    DEAD_SUFFIX,
    DEFAULT_DEAD_MAXLEN,
    DEFAULT_MAXLEN,
    DEFAULT_PUBLISH_TIMEOUT,
    DEFAULT_REPLY_TTL,
    Broker,
    dead_topic,
)
from .codec import decode_frame, encode_frame
from .errors import BrokerFull, MalformedMessage
from .message import DeadLetter, Delivery, Message
from .redis_guard import Guard, as_str, entry_fields, no_group
from .redis_lua import ACK, DEAD, PUBLISH, PUBLISH_MANY, PUBLISH_REPLY, RECLAIM, TOUCH
from .urls import redact_url

log = logging.getLogger(__name__)

FIELD = b"m"


class RedisStreamsBroker(Broker):
    """Topics as Redis streams ``{prefix}{topic}``; see the module docstring."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        maxlen: int = DEFAULT_MAXLEN,
        publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        prefix: str = "cvserve:",
        call_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        reply_ttl: float = DEFAULT_REPLY_TTL,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        maxlen = int(query.pop("maxlen", maxlen))
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self.publish_timeout = float(query.pop("publish_timeout", publish_timeout))
        self.prefix = query.pop("prefix", prefix)
        self.call_timeout = float(query.pop("call_timeout", call_timeout))
        self.dead_maxlen = int(query.pop("dead_maxlen", DEFAULT_DEAD_MAXLEN))
        self.reply_ttl = float(query.pop("reply_ttl", reply_ttl))
        self.url = urlunsplit(parts._replace(query=urlencode(query)))
        self._where = parts.netloc.rpartition("@")[2] or parts.path or "localhost:6379"
        self._redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=None,  # deadlines come from Guard (see the module docstring)
            socket_connect_timeout=connect_timeout,
            # One immediate retry on a fresh connection: a pooled socket that the server
            # closed (restart) is replaced at once; a server that is down fails fast.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=False,
            protocol=2,
        )
        self._publish_script = self._redis.register_script(PUBLISH)
        self._publish_reply_script = self._redis.register_script(PUBLISH_REPLY)
        self._publish_many_script = self._redis.register_script(PUBLISH_MANY)
        self._ack_script = self._redis.register_script(ACK)
        self._dead_script = self._redis.register_script(DEAD)
        self._reclaim_script = self._redis.register_script(RECLAIM)
        self._touch_script = self._redis.register_script(TOUCH)
        self._groups: set[tuple[str, str]] = set()
        self._epoch_key = self.prefix + "epoch"
        self._ask_run_id = True  # INFO may be forbidden to this user (ACL): then not

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"RedisStreamsBroker({self.safe_url!r}, prefix={self.prefix!r})"

    def _guard(self, extra_s: float = 0.0) -> Guard:
        return Guard(self._where, self.call_timeout + extra_s)

    def _key(self, topic: str) -> str:
        return self.prefix + topic

    async def publish(self, topic: str, message: Message, *, timeout: float | None = None) -> str:
        entry_id = await self._publish(self._publish_script, topic, message, timeout)
        assert entry_id is not None
        return entry_id

    async def publish_reply(
        self, topic: str, message: Message, *, timeout: float | None = None
    ) -> str | None:
        ttl_ms = max(1, int(self.reply_ttl * 1000))
        return await self._publish(self._publish_reply_script, topic, message, timeout, ttl_ms)

    async def _publish(
        self, script: Any, topic: str, message: Message, timeout: float | None, *extra: Any
    ) -> str | None:
        frame = encode_frame(message, published_at=time.time())
        key = self._key(topic)
        wait = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        pause = 0.001
        while True:
            async with self._guard():
                entry_id = await script(keys=[key], args=[self.maxlen, frame, *extra])
            if entry_id is not None:
                return as_str(entry_id)
            # Full: poll the length (cheap) until there is room, then send again.
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerFull(topic, self.maxlen, wait)
                await asyncio.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.05)
                async with self._guard():
                    if await self._redis.xlen(key) < self.maxlen:
                        break

    async def publish_many(
        self, topic: str, messages: list[Message], *, timeout: float | None = None
    ) -> list[str]:
        """One round trip for the whole fan-out when the topic has room for all of it;
        otherwise one message at a time, each waiting for room as ``publish`` does."""
        if len(messages) < 2:
            return await super().publish_many(topic, messages, timeout=timeout)
        now = time.time()
        frames = [encode_frame(m, published_at=now) for m in messages]
        async with self._guard():
            ids = await self._publish_many_script(
                keys=[self._key(topic)], args=[self.maxlen, *frames]
            )
        if ids is not None:
            return [as_str(i) for i in ids]
        return await super().publish_many(topic, messages, timeout=timeout)

    async def withdraw(self, topic: str, ids: Iterable[str]) -> int:
        # Entries already delivered are skipped by whoever reclaims them (deleted while
        # pending); the worker running one acknowledges it as usual.
        ids = list(ids)
        if not ids:
            return 0
        async with self._guard():
            return int(await self._redis.xdel(self._key(topic), *ids))

    async def create_group(self, topic: str, group: str) -> None:
        async with self._guard():
            try:
                await self._redis.xgroup_create(self._key(topic), group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._groups.add((topic, group))

    async def consume(
        self, topic: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        if (topic, group) not in self._groups:
            await self.create_group(topic, group)
        key = self._key(topic)
        block = block_ms if block_ms > 0 else None
        async with self._guard(block_ms / 1000):
            try:
                resp = await self._redis.xreadgroup(
                    group, consumer, {key: ">"}, count=count, block=block
                )
            except ResponseError as e:
                if not no_group(e):
                    raise
                # The server lost the stream (restart without persistence): make it again.
                self._groups.discard((topic, group))
                await self.create_group(topic, group)
                resp = await self._redis.xreadgroup(
                    group, consumer, {key: ">"}, count=count, block=block
                )
        return await self._deliveries(topic, group, _entries(resp), redelivered=False)

    async def _deliveries(
        self,
        topic: str,
        group: str,
        entries: list[Any],
        *,
        redelivered: bool,
        counts: list[int] | None = None,
    ) -> list[Delivery]:
        now = time.time()
        out: list[Delivery] = []
        for i, entry in enumerate(entries):
            if entry is None or entry[0] is None:  # deleted while pending (Redis 6.2)
                continue
            entry_id, fields = entry
            eid = as_str(entry_id)
            try:
                frame = fields.get(FIELD)
                if frame is None:
                    raise MalformedMessage(f"entry has no {FIELD!r} field")
                message = decode_frame(frame)
            except MalformedMessage as e:
                # Redelivering it would fail again forever and nothing can answer it: keep
                # it where it can be inspected instead.
                log.error(
                    "moving malformed entry %s of topic %r to dead letters: %s", eid, topic, e
                )
                await self._move_dead(topic, group, eid, f"malformed: {e}", "", None)
                continue
            deliveries = max(1, counts[i]) if counts is not None else 1
            out.append(
                Delivery(eid, topic, message, now, redelivered=redelivered, deliveries=deliveries)
            )
        return out

    async def ack(self, topic: str, group: str, ids: Iterable[str]) -> int:
        args = [group, *ids]
        if len(args) == 1:
            return 0
        async with self._guard():
            return int(await self._ack_script(keys=[self._key(topic)], args=args))

    async def reclaim(
        self, topic: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 100
    ) -> list[Delivery]:
        key = self._key(topic)
        start: bytes | str = "0-0"
        entries: list[Any] = []
        counts: list[int] = []
        async with self._guard():
            while len(entries) < count:
                try:
                    resp = await self._reclaim_script(
                        keys=[key],
                        args=[group, consumer, min_idle_ms, start, count - len(entries)],
                    )
                except ResponseError as e:
                    if no_group(e):
                        return []
                    raise
                start, claimed, claimed_counts = resp[0], resp[1], resp[2]
                entries += [None if e is None else (e[0], entry_fields(e[1])) for e in claimed]
                counts += [int(n) for n in claimed_counts]
                if as_str(start) == "0-0":
                    break
        return await self._deliveries(topic, group, entries, redelivered=True, counts=counts)

    async def touch(self, topic: str, group: str, consumer: str, ids: Iterable[str]) -> int:
        args = [group, consumer, *ids]
        if len(args) == 2:
            return 0
        async with self._guard():
            try:
                return int(await self._touch_script(keys=[self._key(topic)], args=args))
            except ResponseError as e:
                if no_group(e):
                    return 0
                raise

    async def dead_letter(
        self, delivery: Delivery, group: str, *, reason: str, consumer: str = ""
    ) -> str | None:
        msg = delivery.message
        return await self._move_dead(delivery.topic, group, delivery.id, reason, consumer, msg)

    async def _move_dead(
        self,
        topic: str,
        group: str,
        entry_id: str,
        reason: str,
        consumer: str,
        message: Message | None,
    ) -> str | None:
        meta = {
            "topic": topic,
            "entry": entry_id,
            "group": group,
            "reason": reason,
            "dead_at": repr(time.time()),
            "consumer": consumer,
        }
        args: list[Any] = [group, entry_id, self.dead_maxlen]
        for k, v in meta.items():
            args += [k, v]
        async with self._guard():
            try:
                dead_id = await self._dead_script(
                    keys=[self._key(topic), self._key(dead_topic(topic))], args=args
                )
            except ResponseError as e:
                if no_group(e):
                    return None
                raise
        return None if dead_id is None else as_str(dead_id)

    async def dead_letters(self, topic: str | None = None, *, count: int = 100) -> list[DeadLetter]:
        async with self._guard():
            if topic is not None:
                keys = [self._key(dead_topic(topic))]
            else:
                pattern = _glob_escape(self.prefix) + "*" + DEAD_SUFFIX
                keys = sorted(
                    {k async for k in self._redis.scan_iter(match=pattern, _type="stream")}
                )
            out: list[DeadLetter] = []
            for key in keys:
                rows = await self._redis.xrevrange(key, count=count) if count > 0 else []
                out += [_dead_letter(as_str(i), f) for i, f in reversed(rows)]
        return out

    async def length(self, topic: str) -> int:
        async with self._guard():
            return int(await self._redis.xlen(self._key(topic)))

    async def pending(self, topic: str, group: str) -> int:
        async with self._guard():
            try:
                summary = await self._redis.xpending(self._key(topic), group)
            except ResponseError as e:
                if no_group(e):
                    return 0
                raise
        return int(summary["pending"])

    async def delete_topic(self, topic: str) -> None:
        async with self._guard():
            await self._redis.delete(self._key(topic))
        self._groups = {tg for tg in self._groups if tg[0] != topic}

    async def keep_alive(self, topic: str, ttl_s: float) -> None:
        async with self._guard():
            await self._redis.pexpire(self._key(topic), max(1, int(ttl_s * 1000)))

    async def epoch(self) -> str:
        async with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._epoch_key, uuid.uuid4().hex, nx=True)
            pipe.get(self._epoch_key)
            if self._ask_run_id:
                pipe.info("server")
            replies = await pipe.execute(raise_on_error=False)
            for reply in replies[:2]:
                if isinstance(reply, Exception):
                    raise reply  # translated by the guard, like any call's
        run_id = ""
        if self._ask_run_id:
            info = replies[2]
            if isinstance(info, Exception):  # INFO forbidden (ACL): the marker still works
                log.info("redis at %s: no INFO (%s); epoch from the marker key", self._where, info)
                self._ask_run_id = False
            else:
                run_id = str(info.get("run_id", ""))
        return f"{run_id}/{as_str(replies[1])}"

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless the server answers; ``BrokerError`` when it
        refuses the URL's credentials."""
        async with self._guard():
            await self._redis.ping()

    async def close(self) -> None:
        closer = getattr(self._redis, "aclose", None) or self._redis.close
        await closer()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _dead_letter(dead_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
    def field(name: str, default: str = "") -> str:
        value = fields.get(name.encode())
        return default if value is None else as_str(value)

    message = None
    frame = fields.get(FIELD)
    if frame is not None:
        try:
            message = decode_frame(frame)
        except MalformedMessage:
            pass
    return DeadLetter(
        id=dead_id,
        topic=field("topic"),
        entry=field("entry"),
        group=field("group"),
        deliveries=int(field("deliveries", "0")),
        reason=field("reason"),
        dead_at=float(field("dead_at", "0")),
        consumer=field("consumer"),
        message=message,
    )


def _entries(resp: Any) -> list[Any]:
    """The ``(id, fields)`` pairs of a one-stream XREADGROUP reply (RESP2)."""
    return list(resp[0][1]) if resp else []

"""Redis Streams broker: a stream per topic, consumer groups, XAUTOCLAIM, bounded streams.

Each entry holds one field, ``m``: the message frame of ``codec`` (header + raw array
bytes). Two Lua scripts keep the bound exact and never drop unfinished work, since a
stream's own MAXLEN trims the oldest entries whether consumed or not:

- publish: ``XADD`` only while ``XLEN < maxlen``; otherwise the client waits and retries
  until its timeout (``BrokerFull``).
- ack: ``XACK``, then drop what every group has finished: the acknowledged entries
  themselves (``XDEL``) when the stream has one group, else everything below the oldest
  entry that some group has not finished (``XTRIM MINID``).

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
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import DEFAULT_MAXLEN, DEFAULT_PUBLISH_TIMEOUT, Broker
from .codec import decode, encode
from .errors import BrokerError, BrokerFull, BrokerUnavailable, MalformedMessage
from .message import Delivery, Message

log = logging.getLogger(__name__)

FIELD = b"m"

_PUBLISH = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
"""

_PUBLISH_MANY = """
if redis.call('XLEN', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then return false end
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'm', ARGV[i]) end
return ids
"""

_ACK = """
local key, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', key)
local acked = 0
if #groups <= 1 then
  for i = 2, #ARGV do
    if redis.call('XACK', key, group, ARGV[i]) == 1 then
      redis.call('XDEL', key, ARGV[i])
      acked = acked + 1
    end
  end
  return acked
end
for i = 2, #ARGV do
  acked = acked + redis.call('XACK', key, group, ARGV[i])
end
if acked == 0 then return 0 end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local floor_ms, floor_seq
for _, g in ipairs(groups) do
  local name, last
  for j = 1, #g, 2 do
    if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
  end
  local ms, seq
  local summary = redis.call('XPENDING', key, name)
  if summary[1] > 0 then
    ms, seq = parse(summary[2])
  else
    ms, seq = parse(last)
    seq = seq + 1
  end
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
redis.call('XTRIM', key, 'MINID', string.format('%d-%d', floor_ms, floor_seq))
return acked
"""

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


class _Guard:
    """A deadline around one call, and redis-py's failures turned into typed errors.

    Callers handle the replies they expect (NOGROUP, BUSYGROUP) inside the block.
    """

    __slots__ = ("where", "timeout", "_deadline")

    def __init__(self, where: str, timeout: float) -> None:
        self.where = where
        self.timeout = timeout
        self._deadline: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        self._deadline = asyncio.timeout(self.timeout)
        await self._deadline.__aenter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._deadline is not None
        try:
            await self._deadline.__aexit__(exc_type, exc, tb)
        except TimeoutError as e:
            raise BrokerUnavailable(
                f"redis at {self.where} did not answer within {self.timeout:g} s"
            ) from e
        if isinstance(exc, _UNAVAILABLE):
            raise BrokerUnavailable(f"redis at {self.where} unavailable: {exc}") from exc
        if isinstance(exc, RedisError):
            raise BrokerError(f"redis at {self.where}: {exc}") from exc


def _no_group(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        self.url = urlunsplit(parts._replace(query=urlencode(query)))
        self._where = parts.netloc.rpartition("@")[2] or parts.path or "localhost:6379"
        self._redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=None,  # deadlines come from _Guard (see the module docstring)
            socket_connect_timeout=connect_timeout,
            # One immediate retry on a fresh connection: a pooled socket that the server
            # closed (restart) is replaced at once; a server that is down fails fast.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=False,
            protocol=2,
        )
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._publish_many_script = self._redis.register_script(_PUBLISH_MANY)
        self._ack_script = self._redis.register_script(_ACK)
        self._groups: set[tuple[str, str]] = set()

    def _guard(self, extra_s: float = 0.0) -> _Guard:
        return _Guard(self._where, self.call_timeout + extra_s)

    def _key(self, topic: str) -> str:
        return self.prefix + topic

    async def publish(self, topic: str, message: Message, *, timeout: float | None = None) -> str:
        frame = encode(message, published_at=time.time())
        key = self._key(topic)
        wait = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        pause = 0.001
        while True:
            async with self._guard():
                entry_id = await self._publish_script(keys=[key], args=[self.maxlen, frame])
            if entry_id is not None:
                return _text(entry_id)
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
        frames = [encode(m, published_at=now) for m in messages]
        async with self._guard():
            ids = await self._publish_many_script(
                keys=[self._key(topic)], args=[self.maxlen, *frames]
            )
        if ids is not None:
            return [_text(i) for i in ids]
        return await super().publish_many(topic, messages, timeout=timeout)

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
                if not _no_group(e):
                    raise
                # The server lost the stream (restart without persistence): make it again.
                self._groups.discard((topic, group))
                await self.create_group(topic, group)
                resp = await self._redis.xreadgroup(
                    group, consumer, {key: ">"}, count=count, block=block
                )
        return await self._deliveries(topic, group, _entries(resp), redelivered=False)

    async def _deliveries(
        self, topic: str, group: str, entries: list[Any], *, redelivered: bool
    ) -> list[Delivery]:
        now = time.time()
        out: list[Delivery] = []
        bad: list[str] = []
        for entry_id, fields in entries:
            if entry_id is None:  # deleted while pending (Redis 6.2 XAUTOCLAIM)
                continue
            eid = _text(entry_id)
            try:
                frame = fields.get(FIELD)
                if frame is None:
                    raise MalformedMessage(f"entry has no {FIELD!r} field")
                message = decode(frame)
            except MalformedMessage as e:
                # Redelivering it would fail again forever; nothing can answer it.
                log.error("dropping malformed entry %s of topic %r: %s", eid, topic, e)
                bad.append(eid)
                continue
            out.append(Delivery(eid, topic, message, now, redelivered=redelivered))
        if bad:
            await self.ack(topic, group, bad)
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
        async with self._guard():
            while len(entries) < count:
                try:
                    resp = await self._redis.xautoclaim(
                        key,
                        group,
                        consumer,
                        min_idle_ms,
                        start_id=start,
                        count=count - len(entries),
                    )
                except ResponseError as e:
                    if _no_group(e):
                        return []
                    raise
                start, claimed = resp[0], resp[1]
                entries.extend(claimed)
                if _text(start) == "0-0":
                    break
        return await self._deliveries(topic, group, entries, redelivered=True)

    async def length(self, topic: str) -> int:
        async with self._guard():
            return int(await self._redis.xlen(self._key(topic)))

    async def pending(self, topic: str, group: str) -> int:
        async with self._guard():
            try:
                summary = await self._redis.xpending(self._key(topic), group)
            except ResponseError as e:
                if _no_group(e):
                    return 0
                raise
        return int(summary["pending"])

    async def delete_topic(self, topic: str) -> None:
        async with self._guard():
            await self._redis.delete(self._key(topic))
        self._groups = {tg for tg in self._groups if tg[0] != topic}

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless the server answers."""
        async with self._guard():
            await self._redis.ping()

    async def close(self) -> None:
        closer = getattr(self._redis, "aclose", None) or self._redis.close
        await closer()


def _entries(resp: Any) -> list[Any]:
    """The ``(id, fields)`` pairs of a one-stream XREADGROUP reply (RESP2)."""
    return list(resp[0][1]) if resp else []

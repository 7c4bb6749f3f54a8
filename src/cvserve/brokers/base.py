"""The broker contract that every implementation meets and the shared suite checks.

A *topic* is an append-only log of messages. A *group* reads a topic once as a whole:
each message goes to exactly one *consumer* of the group (two workers on one stage
share its load), and every group sees every message (created before the messages, or
first used while they are still held). A delivered message stays *pending* for its
consumer until it is acknowledged; a pending message whose consumer went quiet for
``min_idle_ms`` can be *reclaimed* by another consumer, so a worker that dies before
acknowledging loses nothing. Workers acknowledge only after the result is stored
(published to its reply topic): delivery is at least once, and results are deduplicated
by ``(request_id, index)`` where they are joined (see ``ResultRouter``).

A topic holds at most ``maxlen`` unfinished entries: published, and not yet acknowledged
by every group. ``publish`` waits for room (backpressure) and raises ``BrokerFull`` after
its timeout; unfinished work is never trimmed. An entry is dropped once every group has
acknowledged it (at once when the topic has one group; when it has several, once every
older entry is finished too).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from types import TracebackType

from .message import Delivery, Message

DEFAULT_MAXLEN = 10_000
DEFAULT_PUBLISH_TIMEOUT = 5.0


class Broker(abc.ABC):
    """Topics, consumer groups, acknowledgements and reclaim, behind one asyncio API."""

    maxlen: int
    publish_timeout: float

    @abc.abstractmethod
    async def publish(self, topic: str, message: Message, *, timeout: float | None = None) -> str:
        """Append ``message`` (stamped with ``time.time()``) and return its entry id.

        Waits while the topic holds ``maxlen`` unfinished entries; after ``timeout``
        seconds (default ``publish_timeout``) raises ``BrokerFull``.
        """

    async def publish_many(
        self, topic: str, messages: list[Message], *, timeout: float | None = None
    ) -> list[str]:
        """Publish ``messages`` in order (one request's fan-out); returns their entry ids.

        The same guarantees as ``publish`` for each message; a broker may send them in one
        round trip (Redis does, when the topic has room for all of them).
        """
        return [await self.publish(topic, m, timeout=timeout) for m in messages]

    @abc.abstractmethod
    async def consume(
        self, topic: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        """Up to ``count`` messages not yet delivered to ``group``, oldest first.

        Creates the group on first use (it then starts from the oldest held entry).
        ``block_ms`` > 0 waits that long for a first message; 0 returns at once.
        """

    @abc.abstractmethod
    async def ack(self, topic: str, group: str, ids: Iterable[str]) -> int:
        """Mark deliveries done for ``group``; returns how many were pending."""

    @abc.abstractmethod
    async def reclaim(
        self, topic: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 100
    ) -> list[Delivery]:
        """Take over up to ``count`` pending deliveries idle for at least ``min_idle_ms``.

        Each comes back with ``redelivered=True`` and its idle clock restarted.
        """

    @abc.abstractmethod
    async def create_group(self, topic: str, group: str) -> None:
        """Create ``group`` (reading from the oldest held entry) if it does not exist."""

    @abc.abstractmethod
    async def length(self, topic: str) -> int:
        """How many unfinished entries the topic holds (what ``maxlen`` bounds)."""

    @abc.abstractmethod
    async def pending(self, topic: str, group: str) -> int:
        """How many deliveries of ``group`` await acknowledgement."""

    @abc.abstractmethod
    async def delete_topic(self, topic: str) -> None:
        """Drop the topic, its entries and its groups."""

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless the broker answers (in-process: always)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the broker is not used afterwards."""

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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

An entry that keeps coming back (its consumers die or hang on it every time) is *dead
lettered*: moved, with why and how often it was delivered, to ``<topic>.dead`` (bounded to
its newest ``DEFAULT_DEAD_MAXLEN``) and acknowledged, so it stops taking workers down and
stays there to be inspected (``dead_letters``; ``cvserve broker dead-letters``).

A reply topic belongs to one serving process: it is kept alive by that process
(``keep_alive``) and expires once the process is gone; ``publish_reply`` never makes it
live forever again. ``epoch`` changes when the broker may have lost what it held (a restart without
persistence, a failover), so a publisher can notice and publish again what it still holds.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from types import TracebackType

from .message import DeadLetter, Delivery, Message

DEFAULT_MAXLEN = 10_000
DEFAULT_PUBLISH_TIMEOUT = 5.0
#: Deliveries of one entry before a worker moves it to the dead letters instead.
DEFAULT_MAX_DELIVERIES = 3
#: Dead letters kept per topic (the oldest go first).
DEFAULT_DEAD_MAXLEN = 10_000
DEAD_SUFFIX = ".dead"
#: Seconds a reply topic that a result had to make lives on without its router.
DEFAULT_REPLY_TTL = 60.0


def dead_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return topic + DEAD_SUFFIX


class Broker(abc.ABC):
    """Topics, consumer groups, acknowledgements and reclaim, behind one asyncio API."""

    maxlen: int
    publish_timeout: float

    @property
    @abc.abstractmethod
    def safe_url(self) -> str:
        """The broker's URL without its password: for logs, errors and status pages."""

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

    async def withdraw(self, topic: str, ids: Iterable[str]) -> int:
        """Remove the entries ``ids`` that no consumer has taken yet (their request was
        answered or cancelled); returns how many went. Entries being worked on stay."""
        return 0

    @abc.abstractmethod
    async def publish_reply(
        self, topic: str, message: Message, *, timeout: float | None = None
    ) -> str | None:
        """Publish a result to a reply topic, never keeping a gone server's topic alive.

        A topic that exists is its router's, kept alive by it. A missing one is made with
        an expiry (Redis: the result may have raced a restart that its router recovers
        from next) or, where nothing can race (in-process), the result is dropped and
        None returned.
        """

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
    async def touch(self, topic: str, group: str, consumer: str, ids: Iterable[str]) -> int:
        """``consumer`` still works on ``ids``: restart their idle clocks (their delivery
        counts stay), so that a live worker's slow batch is not reclaimed. Entries another
        consumer has taken over meanwhile are left alone. Returns how many were touched."""

    @abc.abstractmethod
    async def dead_letter(
        self, delivery: Delivery, group: str, *, reason: str, consumer: str = ""
    ) -> str | None:
        """Move a pending entry to ``<topic>.dead`` and acknowledge it, in one step.

        Returns its id among the dead letters, or None when ``group`` no longer holds it
        pending (another consumer finished it meanwhile): then nothing is moved.
        """

    @abc.abstractmethod
    async def dead_letters(self, topic: str | None = None, *, count: int = 100) -> list[DeadLetter]:
        """The newest ``count`` dead letters of ``topic`` (of every topic when None), each
        topic's oldest first."""

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

    async def keep_alive(self, topic: str, ttl_s: float) -> None:
        """Let ``topic`` expire ``ttl_s`` seconds after the latest call (a reply topic
        whose process died). In-process: nothing to do, topics die with the process."""
        return None

    async def epoch(self) -> str:
        """A token that changes when the broker may have lost entries it held (a server
        restarted without persistence, a failover). In-process: never changes."""
        return "in-process"

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

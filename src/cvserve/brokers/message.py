"""What travels through a broker: a message (header + named arrays) and its delivery."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

HeaderValue = str | int | float | bool

#: Work header: the wall clock (``time.time()``) by which its request must be answered.
#: A worker drops an item past it unrun: its request has been answered already (504).
DEADLINE = "deadline"


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(slots=True)
class Message:
    """One unit of work or one result, joined back to its request by ``(request_id, index)``.

    ``index`` is the item's position in its request's fan-out (crop ``i`` of ``N``);
    ``reply_to`` names the topic its result goes to (the serving process's reply topic).
    ``published_at`` is the publisher's wall clock (``time.time()``), stamped by
    ``Broker.publish``, so a consumer in another process can time the ``broker`` stage.
    """

    request_id: str
    index: int = 0
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    reply_to: str = ""
    id: str = field(default_factory=new_id)
    published_at: float | None = None

    def expired(self, now: float) -> bool:
        """True when the item's request deadline (``DEADLINE``, wall clock) has passed."""
        deadline = self.headers.get(DEADLINE)
        return (
            isinstance(deadline, int | float)
            and not isinstance(deadline, bool)
            and (now >= deadline)
        )

    def reply(
        self,
        arrays: dict[str, np.ndarray] | None = None,
        headers: dict[str, HeaderValue] | None = None,
    ) -> Message:
        """The result message of this item: same request id and index, fresh id."""
        return Message(
            request_id=self.request_id,
            index=self.index,
            headers=dict(headers or {}),
            arrays=dict(arrays or {}),
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to one consumer of a group; ``ack`` it by ``id`` once done.

    ``redelivered`` is true when it came from ``reclaim`` (its first consumer went quiet),
    so the work may have been partly done before. ``deliveries`` counts this one and every
    earlier delivery of the entry to its group (a worker dead-letters an entry that keeps
    killing its consumers). ``consumed_at`` is ``time.time()``.
    """

    id: str
    topic: str
    message: Message
    consumed_at: float
    redelivered: bool = False
    deliveries: int = 1

    @property
    def broker_s(self) -> float:
        """Publish-to-consume time in seconds: the ``broker`` stage of this hop."""
        published = self.message.published_at
        return 0.0 if published is None else max(0.0, self.consumed_at - published)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry moved to its topic's dead-letter topic (``<topic>.dead``), kept to inspect.

    ``message`` is None when the entry did not decode (a foreign or corrupt frame).
    ``dead_at`` is ``time.time()`` of the move; ``consumer`` the one that moved it.
    """

    id: str  # its id in the dead-letter topic
    topic: str  # the topic it was taken from
    entry: str  # its id there
    group: str
    deliveries: int
    reason: str
    dead_at: float
    consumer: str
    message: Message | None

    @property
    def request_id(self) -> str:
        return self.message.request_id if self.message is not None else ""

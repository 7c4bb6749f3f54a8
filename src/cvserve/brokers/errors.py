"""Typed broker errors: every backend translates its own failures into these, once."""

from __future__ import annotations


class BrokerError(Exception):
    """Base class of every error a broker raises."""


class BrokerUnavailable(BrokerError):
    """The broker server cannot be reached (refused, reset, timed out).

    Raised quickly (short socket timeouts); the broker object reconnects by itself on a
    later call once the server is back, so callers retry or fail the request, never wait.
    """


class BrokerFull(BrokerError):
    """A topic held ``maxlen`` unfinished entries for longer than the publish timeout."""

    def __init__(self, topic: str, maxlen: int, timeout: float) -> None:
        super().__init__(
            f"topic {topic!r} holds {maxlen} unfinished entries (maxlen); "
            f"no room within {timeout:g} s"
        )
        self.topic = topic
        self.maxlen = maxlen
        self.timeout = timeout


class MalformedMessage(BrokerError, ValueError):
    """A frame that does not decode, or a message that cannot be encoded (never pickled)."""


class ResultTimeout(BrokerError, TimeoutError):
    """The results of a request did not all arrive before its timeout."""

    def __init__(self, request_id: str, received: int, expected: int, timeout: float) -> None:
        super().__init__(
            f"request {request_id!r}: {received} of {expected} results within {timeout:g} s"
        )
        self.request_id = request_id
        self.received = received
        self.expected = expected
        self.timeout = timeout

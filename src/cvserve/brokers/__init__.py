"""Message brokers between pipeline stages: in-process queues and Redis Streams.

``broker_from_url("inprocess://")`` (the default, no server) or
``broker_from_url("redis://[user:password@]host:port/db?maxlen=10000")`` (``rediss://``
for TLS); every broker has the same asyncio API (``Broker``) and passes the same test
suite. ``StageConsumer`` serves a stage from a topic (and dead-letters what keeps killing
its workers); ``ResultRouter`` joins the results back to their requests (and publishes
them again if the broker loses them). ``redact_url`` is a URL fit for a log line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .base import (
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAXLEN,
    DEFAULT_PUBLISH_TIMEOUT,
    Broker,
    dead_topic,
)
from .codec import decode_frame, encode_frame
from .consumer import ConsumerStats, StageConsumer, consumer_name
from .errors import BrokerError, BrokerFull, BrokerUnavailable, MalformedMessage, ResultTimeout
from .inprocess import InProcessBroker
from .message import DeadLetter, Delivery, Message
from .router import ResultRouter, RouterStats
from .urls import redact_url

if TYPE_CHECKING:
    from .redis_streams import RedisStreamsBroker

__all__ = [
    "DEFAULT_MAXLEN",
    "DEFAULT_MAX_DELIVERIES",
    "DEFAULT_PUBLISH_TIMEOUT",
    "Broker",
    "BrokerError",
    "BrokerFull",
    "BrokerUnavailable",
    "DeadLetter",
    "Delivery",
    "InProcessBroker",
    "MalformedMessage",
    "Message",
    "RedisStreamsBroker",
    "ResultRouter",
    "ResultTimeout",
    "RouterStats",
    "StageConsumer",
    "ConsumerStats",
    "broker_from_url",
    "consumer_name",
    "dead_topic",
    "decode_frame",
    "encode_frame",
    "redact_url",
]

SCHEMES = ("inprocess", "redis", "rediss", "unix")


def __getattr__(name: str) -> Any:
    # redis-py is imported only when a Redis broker is asked for.
    if name == "RedisStreamsBroker":
        from .redis_streams import RedisStreamsBroker

        return RedisStreamsBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def broker_from_url(url: str, **options: Any) -> Broker:
    """A broker for ``url``: ``inprocess://`` or ``redis://[[user]:password@]host:port/db``
    (``rediss://`` for TLS, with redis-py's ``ssl_*`` query parameters; ``unix://``).

    Query parameters ``maxlen`` (unfinished entries per topic) and ``publish_timeout``
    (seconds a publish waits for room) apply to both; ``options`` are passed to the class.
    Raises ``ValueError`` naming the URL without its password.
    """
    scheme = urlsplit(url).scheme
    if scheme == "inprocess":
        query = dict(parse_qsl(urlsplit(url).query))
        unknown = set(query) - {"maxlen", "publish_timeout"}
        if unknown:
            raise ValueError(f"unknown broker URL parameter(s) {sorted(unknown)} in {url!r}")
        if "maxlen" in query:
            options.setdefault("maxlen", int(query["maxlen"]))
        if "publish_timeout" in query:
            options.setdefault("publish_timeout", float(query["publish_timeout"]))
        return InProcessBroker(**options)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .redis_streams import RedisStreamsBroker
        except ImportError as e:  # pragma: no cover - redis is a dependency
            raise ValueError(f"{url!r} needs the redis package (pip install redis)") from e
        return RedisStreamsBroker(url, **options)
    raise ValueError(
        f"unknown broker URL {redact_url(url)!r}: expected one of {', '.join(SCHEMES)}://"
    )

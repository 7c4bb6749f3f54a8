"""Message brokers between pipeline stages: in-process queues and Redis Streams.

``broker_from_url("inprocess://")`` (the default, no server) or
``broker_from_url("redis://host:port/db?maxlen=10000")``; every broker has the same
asyncio API (``Broker``) and passes the same test suite. ``StageWorker`` serves a stage
from a topic; ``ResultRouter`` joins the results back to their requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .base import DEFAULT_MAXLEN, DEFAULT_PUBLISH_TIMEOUT, Broker
from .codec import decode, encode
from .errors import BrokerError, BrokerFull, BrokerUnavailable, MalformedMessage, ResultTimeout
from .inprocess import InProcessBroker
from .message import Delivery, Message
from .router import ResultRouter, RouterStats
from .worker import StageWorker, WorkerStats, consumer_name

if TYPE_CHECKING:
    from .redis_streams import RedisStreamsBroker

__all__ = [
    "DEFAULT_MAXLEN",
    "DEFAULT_PUBLISH_TIMEOUT",
    "Broker",
    "BrokerError",
    "BrokerFull",
    "BrokerUnavailable",
    "Delivery",
    "InProcessBroker",
    "MalformedMessage",
    "Message",
    "RedisStreamsBroker",
    "ResultRouter",
    "ResultTimeout",
    "RouterStats",
    "StageWorker",
    "WorkerStats",
    "broker_from_url",
    "consumer_name",
    "decode",
    "encode",
]

SCHEMES = ("inprocess", "redis", "rediss", "unix")


def __getattr__(name: str) -> Any:
    # redis-py is imported only when a Redis broker is asked for.
    if name == "RedisStreamsBroker":
        from .redis_streams import RedisStreamsBroker

        return RedisStreamsBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def broker_from_url(url: str, **options: Any) -> Broker:
    """A broker for ``url``: ``inprocess://`` or ``redis://host:port/db``.

    Query parameters ``maxlen`` (unfinished entries per topic) and ``publish_timeout``
    (seconds a publish waits for room) apply to both; ``options`` are passed to the class.
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
    raise ValueError(f"unknown broker URL {url!r}: expected one of {', '.join(SCHEMES)}://")

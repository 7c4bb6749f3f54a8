"""The package's public surface, the URL factory, and cancellation of broker calls."""

from __future__ import annotations

import asyncio

import pytest

import cvserve.brokers as brokers
from cvserve.brokers import Broker, InProcessBroker, Message, broker_from_url

from .conftest import run


def test_public_names_are_pinned():
    assert sorted(brokers.__all__) == [
        "Broker", "BrokerError", "BrokerFull", "BrokerUnavailable", "ConsumerStats",
        "DEFAULT_MAXLEN", "DEFAULT_MAX_DELIVERIES", "DEFAULT_PUBLISH_TIMEOUT", "DeadLetter",
        "Delivery", "InProcessBroker", "MalformedMessage", "Message", "RedisStreamsBroker",
        "ResultRouter", "ResultTimeout", "RouterStats", "StageConsumer", "broker_from_url",
        "consumer_name", "dead_topic", "decode_frame", "encode_frame", "redact_url",
    ]  # fmt: skip
    for name in brokers.__all__:
        assert getattr(brokers, name) is not None


def test_errors_form_one_hierarchy():
    for name in ("BrokerFull", "BrokerUnavailable", "MalformedMessage", "ResultTimeout"):
        assert issubclass(getattr(brokers, name), brokers.BrokerError)


def test_inprocess_url():
    b = broker_from_url("inprocess://?maxlen=12&publish_timeout=0.25")
    assert isinstance(b, InProcessBroker) and (b.maxlen, b.publish_timeout) == (12, 0.25)
    assert broker_from_url("inprocess://").maxlen == brokers.DEFAULT_MAXLEN


def test_redis_url_gives_a_redis_broker_without_connecting():
    b = broker_from_url("redis://127.0.0.1:1/3")
    assert isinstance(b, brokers.RedisStreamsBroker) and isinstance(b, Broker)


@pytest.mark.parametrize(
    "url", ["kafka://host:9092", "inprocess://?bogus=1", "inprocess://?maxlen=0", "nope"]
)
def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError):
        broker_from_url(url)


def test_cancelling_a_busy_caller_always_cancels_it(make_broker):
    # On Python 3.11 a cancellation can be lost inside asyncio.wait_for; redis-py uses it
    # when given a socket timeout. A lost cancel leaves a consume loop running forever.
    async def main():
        async with make_broker() as b:

            async def busy() -> None:
                for _ in range(3000):  # ends (and fails the test) if a cancel is lost
                    await b.publish("t", Message("r"))
                    got = await b.consume("t", "g", "c", count=1, block_ms=5)
                    await b.ack("t", "g", [d.id for d in got])

            for i in range(40):
                task = asyncio.create_task(busy())
                await asyncio.sleep(0.0005 * (i % 6))
                task.cancel()
                async with asyncio.timeout(5):
                    with pytest.raises(asyncio.CancelledError):
                        await task

    run(main(), timeout=60)

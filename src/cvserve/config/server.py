"""The HTTP server's settings and the resources its models share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cvserve.config.checks import ConfigError, duration_ms, flag, integer
from cvserve.config.model import ModelConfig
from cvserve.config.pipeline import PipelineConfig
from cvserve.images.decode import DEFAULT_MAX_PIXELS

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
#: ``model_control`` modes (``--model-control``), as Triton's.
MODEL_CONTROL_MODES = ("none", "explicit", "poll")
#: ``trace_exporter`` values (``--trace-exporter``; ``cvserve.otel.EXPORTERS``).
TRACE_EXPORTERS = ("none", "console", "otlp")


def default_pixels_in_flight(max_pixels: int, bytes_per_pixel: int = 12) -> int:
    """Half the memory available now (``MemAvailable``, or the cgroup's limit if lower) at
    ``bytes_per_pixel`` (a decoded RGB pixel and its working copies), at least one
    ``max_pixels`` image."""
    return max(max_pixels, available_memory() // 2 // bytes_per_pixel)


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``, or the cgroup's limit if lower)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw.isdigit():
            avail = min(avail or int(raw), int(raw))
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    return avail


def default_body_bytes_in_flight(max_body_bytes: int) -> int:
    """Room for two bodies of ``max_body_bytes`` (64 MiB by default: one largest body, or
    some 30 ordinary 2 MB photos, arriving at once, while a full one leaves the other
    half to the rest), but no more than an eighth of the memory available, and at least
    one ``max_body_bytes`` (a lone upload of the largest body always fits)."""
    return max(max_body_bytes, min(2 * max_body_bytes, available_memory() // 8))


def _port(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer port, not {value!r}")
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key} {value} is not a port (0-65535)")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server and the resources its models share."""

    #: Address to listen on (``0.0.0.0``: every interface).
    host: str = "127.0.0.1"
    #: HTTP port (``/v1``, ``/v2``, health, metrics); 0: any free port.
    port: int = 8000
    #: KServe v2 gRPC (``tritonclient.grpc``) on this port too, in the same process; None:
    #: off, 0: any free port.
    grpc_port: int | None = None
    #: Threads that decode, resize and normalize (shared by all models); 0 = cores.
    preprocess_threads: int = 0
    #: Largest request body in bytes (413 above, read from the headers).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Largest image in pixels (413 above, read from the image header before decoding).
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Decoded pixels in flight at once, server-wide (counted from the headers before
    #: decoding); an image that does not fit gets a 429. 0: ``default_pixels_in_flight``.
    max_pixels_in_flight: int = 0
    #: Bytes of request bodies being received at once, server-wide (a body's declared
    #: size from its head on; ``cvserve.serving.protocol``): a body that would leave less
    #: room than it takes gets 503 and Retry-After before it is read, so stalled uploads
    #: cannot hold more memory than this. 0: ``default_body_bytes_in_flight`` (twice
    #: ``max_body_bytes``, at most an eighth of the memory available).
    max_body_bytes_in_flight: int = 0
    #: How long SIGTERM waits for in-flight requests before exiting anyway (YAML
    #: ``drain_timeout_ms``; ``drain_timeout_s`` is its deprecated spelling in seconds).
    drain_timeout_ms: float = 30_000.0
    #: After SIGTERM, how long the server keeps serving new work (readiness already fails,
    #: responses say ``Connection: close``) so a load balancer can stop sending to it.
    drain_delay_ms: float = 0.0
    #: Join ``port`` with SO_REUSEPORT (several servers on one port, the kernel spreading
    #: connections); the server joins once its models are loaded.
    reuse_port: bool = False
    #: Server processes sharing ``port`` (SO_REUSEPORT; ``cvserve.serving.replicas``): each
    #: loads every model, and a parent starts, watches and stops them. 1: this process.
    workers: int = 1
    #: A file of API keys, one a line: requests need ``Authorization: Bearer KEY``.
    api_key_file: str | None = None
    #: TLS certificate chain and private key (PEM files) for HTTP and gRPC.
    tls_cert: str | None = None
    #: The private key of ``tls_cert``.
    tls_key: str | None = None
    #: ``/metrics`` (and ``/healthz``, ``/readyz``) on this port of its own, plain HTTP and
    #: without API keys; None: ``/metrics`` on the main port.
    metrics_port: int | None = None
    #: HTTP limits before trust (``cvserve.serving.protocol``). Request line and headers
    #: together, in bytes (431 above): 64 KiB, what an AWS ALB forwards, room for large
    #: bearer tokens and cookies, yet a 200 MB header costs nothing.
    max_header_bytes: int = 64 * 1024
    #: Header fields in one request (431 above): 100, Apache's LimitRequestFields.
    max_headers: int = 100
    #: A connection with no request under way (a new one too) is closed after this long:
    #: 30 s, uvicorn's value here before these limits: a client pool reusing connections
    #: seldom meets a close, and idle sockets still go.
    keep_alive_timeout_ms: float = 30_000.0
    #: From a request's first byte, its headers must be complete within this (slowloris;
    #: 408 after it): 20 s, Apache mod_reqtimeout's default.
    header_timeout_ms: float = 20_000.0
    #: A request body that receives no byte for this long is closed (inactivity, so a slow
    #: but steady upload always succeeds): 30 s, half of nginx's client_body_timeout (60 s).
    body_timeout_ms: float = 30_000.0
    #: Open HTTP connections; over it the least recently active one with no request under
    #: way is closed (503 if every one is busy). 0: three quarters of the descriptor
    #: limit, at most 4096 (each idle connection costs about 10 KB).
    max_connections: int = 0
    #: The model store (default ``$CVSERVE_CACHE`` or ``~/.cache/cvserve``).
    cache_dir: str | None = None
    #: Models that change while the server runs (``cvserve.serving.control``), as Triton's
    #: ``--model-control-mode``: ``none`` (what starts is served until exit), ``explicit``
    #: (the repository API loads and unloads) or ``poll`` (the store is watched).
    model_control: str = "none"
    #: ``poll``: how often the store is looked at.
    poll_interval_ms: float = 5_000.0
    #: Memory the loaded models may take together (their weights, runtime and batch
    #: buffers, as estimated before a load); a load past it is refused (507).
    #: 0: whatever memory is available at the time of the load.
    model_memory_bytes: int = 0
    #: Where pipeline stages meet: ``inprocess://`` (default) or ``redis://host:port``.
    broker: str = "inprocess://"
    #: Each request as an OpenTelemetry trace of its stages (``cvserve.otel``; the ``otel``
    #: extra): ``none`` (off), ``console`` (stdout) or ``otlp`` (OTLP over HTTP, to where
    #: the standard ``OTEL_EXPORTER_OTLP_*`` variables say; default localhost:4318).
    trace_exporter: str = "none"
    #: The ``service.name`` of the traces' resource.
    trace_service_name: str = "cvserve"
    models: tuple[ModelConfig, ...] = ()
    pipelines: tuple[PipelineConfig, ...] = ()

    def __post_init__(self) -> None:
        _port("port", self.port)
        if self.grpc_port is not None:
            _port("grpc_port", self.grpc_port)
            if self.grpc_port and self.grpc_port == self.port:
                raise ConfigError(f"grpc_port and port are both {self.port}: use two ports")
        if self.metrics_port is not None:
            _port("metrics_port", self.metrics_port)
            if self.metrics_port and self.metrics_port in (self.port, self.grpc_port):
                raise ConfigError(f"metrics_port {self.metrics_port} is taken by another door")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, not {self.workers!r}")
        if self.workers > 1 and self.grpc_port is not None:
            raise ConfigError(
                f"grpc_port with workers {self.workers}: the gRPC port is not shared between "
                "server processes; serve gRPC with workers 1 (or one server per gRPC port)"
            )
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"model_control {self.model_control!r}; choose one of "
                f"{', '.join(MODEL_CONTROL_MODES)}"
            )
        if self.trace_exporter not in TRACE_EXPORTERS:
            raise ConfigError(
                f"trace_exporter {self.trace_exporter!r}; choose one of "
                f"{', '.join(TRACE_EXPORTERS)}"
            )
        if not isinstance(self.trace_service_name, str) or not self.trace_service_name:
            raise ConfigError(f"trace_service_name must be a name, not {self.trace_service_name!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both a certificate (tls_cert) and its key (tls_key)")
        try:
            integer("preprocess_threads", self.preprocess_threads, 0)
            integer("max_body_bytes", self.max_body_bytes, 1)
            integer("max_pixels", self.max_pixels, 1)
            integer("max_pixels_in_flight", self.max_pixels_in_flight, 0)
            integer("max_body_bytes_in_flight", self.max_body_bytes_in_flight, 0)
            duration_ms("drain_timeout_ms", self.drain_timeout_ms, positive=False)
            duration_ms("drain_delay_ms", self.drain_delay_ms, positive=False)
            flag("reuse_port", self.reuse_port)
            for key in ("keep_alive_timeout_ms", "header_timeout_ms", "body_timeout_ms"):
                duration_ms(key, getattr(self, key), positive=True)
            integer("max_header_bytes", self.max_header_bytes, 1024)
            integer("max_headers", self.max_headers, 1)
            integer("max_connections", self.max_connections, 0)
            duration_ms("poll_interval_ms", self.poll_interval_ms, positive=True)
            integer("model_memory_bytes", self.model_memory_bytes, 0)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.max_pixels_in_flight and not self.max_pixels_in_flight >= self.max_pixels:
            raise ConfigError(
                f"max_pixels_in_flight ({self.max_pixels_in_flight}) must hold one image of "
                f"max_pixels ({self.max_pixels}), or be 0 (from the memory available)"
            )

        if self.max_body_bytes_in_flight and self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ConfigError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must hold one "
                f"body of max_body_bytes ({self.max_body_bytes}), or be 0 (the default)"
            )

    @property
    def drain_timeout_s(self) -> float:
        """``drain_timeout_ms`` in seconds (what ``asyncio`` waits take)."""
        return self.drain_timeout_ms / 1000.0

    @property
    def drain_delay_s(self) -> float:
        """``drain_delay_ms`` in seconds (what ``asyncio.sleep`` takes)."""
        return self.drain_delay_ms / 1000.0

    def resolved_preprocess_threads(self) -> int:
        return self.preprocess_threads or (os.cpu_count() or 1)

    def resolved_body_bytes_in_flight(self) -> int:
        return self.max_body_bytes_in_flight or default_body_bytes_in_flight(self.max_body_bytes)

    def resolved_pixels_in_flight(self) -> int:
        return self.max_pixels_in_flight or default_pixels_in_flight(self.max_pixels)

"""The HTTP edge: routes, the one mapping from typed errors to status codes, Server-Timing.

``POST /v1/models/{name}:predict`` takes the image bytes as the body; ``GET /v1/models``,
``/healthz``, ``/readyz`` and ``/metrics`` describe and watch the server. What every
request passes first (request ids, API keys, the readiness gate, the failure log line) is
:mod:`cvserve.serving.edge`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cvserve.config import ServerConfig
from cvserve.errors import RequestError
from cvserve.serving import logs
from cvserve.serving.auth import ApiKeys
from cvserve.serving.core import PreprocessPool, Servable
from cvserve.serving.edge import Edge
from cvserve.serving.errors import (
    BadRequest,
    BodyTooLarge,
    Draining,
    NotServed,
    UnsupportedMediaType,
    http_status,
)
from cvserve.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cvserve.serving.metrics import Metrics
from cvserve.tasks.encode import encode_result
from cvserve.trace import Trace, format_server_timing

log = logging.getLogger(__name__)

#: Request header that overrides the model's default deadline, in milliseconds.
TIMEOUT_HEADER = "x-timeout-ms"
_ACCEPTED_TYPES = ("image/", "application/octet-stream")


class ServerState:
    """What the routes share: the models, the metrics and where the server is in its life.

    ``loading`` until :meth:`start` has started every servable (work gets 503, readiness
    fails); ``stopping`` from the first exit signal (readiness fails, every response says
    ``Connection: close``, work is still served); ``draining`` once the server refuses new
    work (503) and waits for the requests in flight.
    """

    def __init__(
        self,
        config: ServerConfig,
        models: Mapping[str, Servable] | None = None,
        pool: PreprocessPool | None = None,
        pipelines: Mapping[str, Servable] | None = None,
        metrics: Metrics | None = None,
        broker: Any = None,
    ) -> None:
        self.config = config
        self.models = dict(models or {})
        self.pipelines = dict(pipelines or {})
        self.pool = pool if pool is not None else PreprocessPool(1)
        self.metrics = metrics or Metrics()
        self.broker = broker
        self.loading = True
        self.stopping = False
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def servables(self) -> dict[str, Servable]:
        return {**self.models, **self.pipelines}

    @property
    def ready(self) -> bool:
        """Readiness: loaded, not shutting down, every servable ready."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        if self.loading:
            return "loading"
        if self.stopping or self.draining:
            return "draining"
        not_ready = [n for n, t in self.servables.items() if not t.ready]
        return f"models not ready: {not_ready}" if not_ready else None

    async def start(
        self,
        models: Mapping[str, Servable],
        pipelines: Mapping[str, Servable] | None = None,
        broker: Any = None,
    ) -> None:
        """Take the loaded servables, start (warm) each, and stop ``loading``."""
        self.models, self.pipelines = dict(models), dict(pipelines or {})
        self.broker = broker
        for servable in self.servables.values():
            await servable.start()
        # Everything loaded so far (modules, sessions, protobuf descriptors) lives as
        # long as the server: out of the collector's way, a full collection scans only
        # what requests allocate. Measured on the v2 HTTP door at c=16: full collections
        # every ~0.3 s took 15-30 ms each (the p99 tail), 0.4 ms once frozen.
        gc.collect()
        gc.freeze()
        self.loading = False
        log.info("ready: %s", ", ".join(self.servables))

    async def close(self) -> None:
        """Stop the pipelines, the broker and the models, then the pool."""
        for p in self.pipelines.values():
            await p.stop()
        if self.broker is not None:
            await self.broker.close()
        for ms in self.models.values():
            await ms.stop()
        self.pool.shutdown()

    def observe(
        self, label: str, target: Servable | None, status: int, trace: Trace, images: int = 1
    ) -> None:
        """One answered request, whichever door it came through: metrics and statistics
        (``images``: how many the request carried)."""
        self.metrics.observe_request(label, status, trace.stages)
        if target is not None:
            target.stats.record(trace.stages, ok=200 <= status < 300, inferences=images)

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def begin_stop(self) -> None:
        """Shutdown has begun: readiness fails and responses close their connections, while
        new work is still served (a load balancer needs a moment to stop sending)."""
        self.stopping = True

    def begin_drain(self) -> None:
        """Answer 503 to new work from now on; in-flight requests carry on."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.inflight)
        self.stopping = True
        self.draining = True

    async def drained(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 past ``limit`` bytes (declared or streamed); every HTTP door."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(
            f"request body is {declared} bytes; the limit is {limit}", max_body_bytes=limit
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(
                f"request body exceeds the limit of {limit} bytes", max_body_bytes=limit
            )
        chunks.append(chunk)
    return b"".join(chunks)


def timeout_s(request: Request, default_ms: float) -> float:
    """The request's deadline in seconds: the ``X-Timeout-Ms`` header, else ``default_ms``."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default_ms / 1000.0
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not 0 < ms <= 3_600_000:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds in (0, 3600000]")
    return ms / 1000.0


async def predict(request: Request) -> Response:
    """``POST /v1/models/{name}:predict``."""
    state: ServerState = request.app.state.cvserve
    return await _predict(request, state.models, "model")


async def predict_pipeline(request: Request) -> Response:
    """``POST /v1/pipelines/{name}:predict``."""
    state: ServerState = request.app.state.cvserve
    return await _predict(request, state.pipelines, "pipeline")


async def _predict(request: Request, targets: Mapping[str, Servable], what: str) -> Response:
    trace = Trace()
    state: ServerState = request.app.state.cvserve
    name = request.path_params["name"]
    label = name if name in targets else "_unknown"
    status = 200
    headers: dict[str, str] = {}
    target = targets.get(name)
    state.enter()
    try:
        try:
            if state.draining:
                raise Draining("server is shutting down; retry on another replica")
            if target is None:
                raise NotServed(
                    f"no {what} named {name!r}; serving: {', '.join(targets) or 'none'}",
                    **{f"{what}s": list(targets)},
                )
            ctype = request.headers.get("content-type", "application/octet-stream").lower()
            if not ctype.startswith(_ACCEPTED_TYPES):
                raise UnsupportedMediaType(
                    f"content-type {ctype!r}: send the image bytes as image/* or "
                    "application/octet-stream"
                )
            data = await read_body(request, state.config.max_body_bytes)
            trace.mark("recv")
            deadline = trace.start + timeout_s(request, target.timeout_ms)
            params = target.parse_params(request.query_params)
            pred = await target.predict(data, trace, deadline, params)
            payload = {
                what: name,
                "task": target.task,
                "image_size": list(pred.image_size),
                "batch_size": pred.batch_size,
                **pred.result,
            }
        except RequestError as e:  # the edge logs the request's one line (serving.edge)
            status = http_status(e)
            payload = e.to_json()
            if status == 429:
                headers["Retry-After"] = str(e.retry_after_s)
        except Exception as e:  # a server fault: answer it, keep serving
            rec = logs.current()
            if rec is not None:
                rec.exc = e  # its traceback goes with the request's log line
            else:
                log.exception("%s: internal error", name)
            status = 500
            payload = {"error": {"kind": "internal", "message": f"internal error: {e}"}}
        accept = request.headers.get("accept")
        if status == 200 and target is not None and target.heavy:  # PNG/npz: real CPU
            body, media = await state.pool.submit(
                trace, encode_result, payload, accept, deadline=math.inf, stage="encode"
            )
        else:
            body, media = encode_result(payload, accept if status == 200 else None)
        trace.mark("encode")
        headers["Server-Timing"] = trace.server_timing()
        return Response(body, status_code=status, media_type=media, headers=headers)
    finally:
        state.leave()
        state.observe(label, target, status, trace)


def _timed(handler):
    """Non-predict routes: their whole time is producing the response (``encode``)."""

    async def wrapped(request: Request) -> Response:
        t0 = time.perf_counter()
        resp = await handler(request)
        resp.headers["Server-Timing"] = format_server_timing({"encode": time.perf_counter() - t0})
        return resp

    return wrapped


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    return _json({"models": [ms.describe() for ms in state.models.values()]})


async def show_model(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    ms = state.models.get(request.path_params["name"])
    if ms is None:
        e = NotServed(f"no model named {request.path_params['name']!r}")
        return _json(e.to_json(), http_status(e))
    return _json(ms.describe())


async def list_pipelines(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    return _json({"pipelines": [p.describe() for p in state.pipelines.values()]})


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    why = state.not_ready_reason()
    if why is not None:
        return _json({"ready": False, "reason": why}, 503)
    return _json({"ready": True, "models": list(state.models), "pipelines": list(state.pipelines)})


def refresh_gauges(state: ServerState) -> None:
    """Set the gauges from the models' state now (queue depth, busy instances, admission)."""
    m, nan = state.metrics, float("nan")
    for name, ms in state.models.items():
        m.queue_depth.labels(name).set(ms.inflight)
        m.busy_instances.labels(name).set(ms.batcher.busy_instances)
        adm = ms.admission
        rate, wait, limit = adm.rate.per_s, adm.expected_wait_s(), adm.wait_limit_s()
        m.service_rate.labels(name).set(nan if rate is None else rate)
        m.expected_wait.labels(name).set(nan if wait is None else wait)
        m.wait_limit.labels(name).set(nan if limit is None else limit)


async def metrics_endpoint(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    refresh_gauges(state)
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    payload: dict[str, Any] = {"error": {"kind": kind, "message": exc.detail}}
    if request.url.path.startswith("/v2/") or request.url.path == "/v2":
        payload = {"error": str(exc.detail)}  # KServe v2's error shape
    resp = _json(payload, exc.status_code)
    resp.headers["Server-Timing"] = format_server_timing({"encode": 0.0})
    return resp


def create_app(state: ServerState, keys: ApiKeys | None = None, *, metrics: bool = True) -> Edge:
    """The ASGI app of the main port over ``state`` (whose servables may still be loading):
    ``/v1``, KServe v2, health, readiness and, unless it has a port of its own
    (``metrics=False``), ``/metrics``; behind the :class:`~cvserve.serving.edge.Edge`."""
    routes = [
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
        Route("/v1/pipelines/{name}:predict", predict_pipeline, methods=["POST"]),
        Route("/v1/pipelines", _timed(list_pipelines), methods=["GET"]),
        Route("/v1/models", _timed(list_models), methods=["GET"]),
        Route("/v1/models/{name}", _timed(show_model), methods=["GET"]),
        Route("/healthz", _timed(healthz), methods=["GET"]),
        Route("/readyz", _timed(readyz), methods=["GET"]),
    ]
    if metrics:
        routes.append(Route("/metrics", _timed(metrics_endpoint), methods=["GET"]))
    from cvserve.serving.v2.http import routes as v2_routes  # it imports this module

    routes += v2_routes()
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.cvserve = state
    return Edge(app, state, keys)


def create_metrics_app(state: ServerState) -> Edge:
    """The metrics port's app: ``/metrics``, ``/healthz`` and ``/readyz``, without API keys
    (the port is for the operator's network: Prometheus and probes of this one replica)."""
    routes = [
        Route("/metrics", _timed(metrics_endpoint), methods=["GET"]),
        Route("/healthz", _timed(healthz), methods=["GET"]),
        Route("/readyz", _timed(readyz), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.cvserve = state
    return Edge(app, state)

"""The HTTP app of each port, assembled from the doors: ``/v1``
(:mod:`cvserve.serving.v1`), KServe v2 (:mod:`cvserve.serving.v2.http`), and the routes that
watch the server (``/healthz``, ``/readyz``, ``/metrics``), behind the
:class:`~cvserve.serving.edge.Edge` (request ids, API keys, the readiness gate, the failure
log line). What the doors share is :class:`~cvserve.serving.state.ServerState`; the
per-request rules are :mod:`cvserve.serving.door`.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cvserve.serving import v1
from cvserve.serving.auth import ApiKeys
from cvserve.serving.edge import Edge
from cvserve.serving.httpwire import json_response, timed
from cvserve.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cvserve.serving.state import ServerState
from cvserve.serving.v2 import http as v2_http
from cvserve.trace import format_server_timing

__all__ = ["ServerState", "create_app", "create_metrics_app", "refresh_gauges"]


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    why = state.not_ready_reason()
    if why is not None:
        return json_response({"ready": False, "reason": why}, 503)
    return json_response(
        {"ready": True, "models": list(state.models), "pipelines": list(state.pipelines)}
    )


def refresh_gauges(state: ServerState) -> None:
    """Set the gauges from the models' state now (queue depth, busy instances, admission).
    Never NaN, which dashboards and alert rules handle badly: 0 until measured."""
    m = state.metrics
    for name, ms in state.models.items():
        m.queue_depth.labels(name).set(ms.inflight)
        m.busy_instances.labels(name).set(ms.batcher.busy_instances)
        adm = ms.admission
        rate, wait, limit = adm.rate.per_s, adm.expected_wait_s(), adm.wait_limit_s()
        m.service_rate.labels(name).set(rate or 0.0)
        m.expected_wait.labels(name).set(wait or 0.0)
        m.wait_limit.labels(name).set(limit or 0.0)
    m.model_memory.clear()  # versions unloaded since the last look go
    for name, loaded in state.versions.items():
        for version, ms in loaded.items():
            for kind, n in getattr(ms, "memory", dict)().items():
                if n is not None:
                    m.model_memory.labels(name, version, kind.removesuffix("_bytes")).set(n)


async def metrics_endpoint(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    refresh_gauges(state)
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = exc.detail
    allow = (exc.headers or {}).get("Allow")
    if exc.status_code == 405 and allow:
        message = f"{exc.detail}: {request.method} {request.url.path}; use {allow}"
    payload: dict[str, Any] = {"error": {"kind": kind, "message": message}}
    if request.url.path.startswith("/v2/") or request.url.path == "/v2":
        payload = {"error": str(message)}  # KServe v2's error shape
    resp = json_response(payload, exc.status_code, headers=exc.headers)
    resp.headers["Server-Timing"] = format_server_timing({"encode": 0.0})
    return resp


def _watch_routes(metrics: bool) -> list[Route]:
    routes = [
        Route("/healthz", timed(healthz), methods=["GET"]),
        Route("/readyz", timed(readyz), methods=["GET"]),
    ]
    if metrics:
        routes.append(Route("/metrics", timed(metrics_endpoint), methods=["GET"]))
    return routes


def create_app(state: ServerState, keys: ApiKeys | None = None, *, metrics: bool = True) -> Edge:
    """The ASGI app of the main port over ``state`` (whose servables may still be loading):
    ``/v1``, KServe v2, health, readiness and, unless it has a port of its own
    (``metrics=False``), ``/metrics``; behind the :class:`~cvserve.serving.edge.Edge`."""
    routes = [*v1.routes(), *_watch_routes(metrics), *v2_http.routes()]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.cvserve = state
    return Edge(app, state, keys)


def create_metrics_app(state: ServerState) -> Edge:
    """The metrics port's app: ``/metrics``, ``/healthz`` and ``/readyz``, without API keys
    (the port is for the operator's network: Prometheus and probes of this one replica)."""
    app = Starlette(routes=_watch_routes(True), exception_handlers={HTTPException: _http_error})
    app.state.cvserve = state
    return Edge(app, state)

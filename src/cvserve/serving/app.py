"""The HTTP edge: routes, the one mapping from typed errors to status codes, Server-Timing.

``POST /v1/models/{name}:predict`` takes the image bytes as the body; ``GET /v1/models``,
``/healthz``, ``/readyz`` and ``/metrics`` describe and watch the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cvserve.config import ServerConfig
from cvserve.errors import RequestError
from cvserve.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cvserve.serving.metrics import Metrics
from cvserve.serving.model import Draining, ModelServer, PreprocessPool, ServingError
from cvserve.tasks.encode import encode_result
from cvserve.trace import Trace, format_server_timing

log = logging.getLogger(__name__)

#: Request header that overrides the model's default deadline, in milliseconds.
TIMEOUT_HEADER = "x-timeout-ms"
_ACCEPTED_TYPES = ("image/", "application/octet-stream")


class BadRequest(ServingError):
    status = 400
    kind = "bad_request"


class ModelNotFound(ServingError):
    status = 404
    kind = "model_not_found"


class BodyTooLarge(ServingError):
    status = 413
    kind = "body_too_large"


class UnsupportedMediaType(ServingError):
    status = 415
    kind = "unsupported_media_type"


class ServerState:
    """What the routes share: the models, the metrics and the draining flag."""

    def __init__(
        self,
        config: ServerConfig,
        models: Mapping[str, ModelServer],
        pool: PreprocessPool,
        pipelines: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.models = dict(models)
        self.pipelines = dict(pipelines or {})
        self.pool = pool
        self.metrics = Metrics()
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        for name, ms in self.models.items():
            ms.batcher.on_batch = _batch_observer(self.metrics, name)

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def begin_drain(self) -> None:
        """Answer 503 to new work from now on; in-flight requests carry on."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.inflight)
        self.draining = True

    async def drained(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


def _batch_observer(metrics: Metrics, name: str):
    hist = metrics.batch_size.labels(name)
    return lambda info: hist.observe(info.size)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def _read_body(request: Request, limit: int) -> bytes:
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


#: Query parameters a predict request may carry, with their types (task heads use them).
_PARAMS: dict[str, type] = {
    "top_k": int,  # classify, detect
    "threshold": float,  # detect
    "nms_iou": float,  # detect: greedy NMS at this IoU (off unless given)
    "nms_class_agnostic": bool,
    "clip": bool,  # detect: clip boxes to the image
    "score": str,  # detect: "sigmoid" | "softmax" (default: by architecture)
    "ignore_index": int,  # segment: the fill value outside the crop
}


def _params(request: Request) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, raw in request.query_params.items():
        kind = _PARAMS.get(key)
        if kind is None:
            raise BadRequest(f"unknown parameter {key!r}; known: {', '.join(_PARAMS)}")
        try:
            if kind is bool:
                if raw.lower() not in ("1", "0", "true", "false"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("1", "true")
            else:
                value = kind(raw)
        except ValueError:
            raise BadRequest(f"{key} must be a {kind.__name__}, got {raw!r}") from None
        params[key] = value
    top_k = params.get("top_k")
    if top_k is not None and not 1 <= top_k <= 1000:
        raise BadRequest(f"top_k must be an integer in 1..1000, got {top_k}")
    return params


def _timeout_s(request: Request, default_ms: float) -> float:
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


async def _predict(request: Request, targets: Mapping[str, Any], what: str) -> Response:
    trace = Trace()
    state: ServerState = request.app.state.cvserve
    name = request.path_params["name"]
    label = name if name in targets else "_unknown"
    status = 200
    headers: dict[str, str] = {}
    state.enter()
    try:
        try:
            if state.draining:
                raise Draining("server is shutting down; retry on another replica")
            target = targets.get(name)
            if target is None:
                raise ModelNotFound(
                    f"no {what} named {name!r}; serving: {', '.join(targets) or 'none'}",
                    **{f"{what}s": list(targets)},
                )
            ctype = request.headers.get("content-type", "application/octet-stream").lower()
            if not ctype.startswith(_ACCEPTED_TYPES):
                raise UnsupportedMediaType(
                    f"content-type {ctype!r}: send the image bytes as image/* or "
                    "application/octet-stream"
                )
            data = await _read_body(request, state.config.max_body_bytes)
            trace.mark("recv")
            deadline = trace.start + _timeout_s(request, target.timeout_ms)
            params = _params(request)
            pred = await target.predict(data, trace, deadline, params)
            payload = {
                what: name,
                "task": target.task,
                "image_size": list(pred.image_size),
                "batch_size": pred.batch_size,
                **pred.result,
            }
        except RequestError as e:
            status = e.status
            payload = e.to_json()
            if status == 429:
                headers["Retry-After"] = str(e.retry_after_s)
            log.debug("%s: %d %s", name, status, e)
        except Exception as e:  # a server fault: answer it, keep serving
            log.exception("%s: internal error", name)
            status = 500
            payload = {"error": {"kind": "internal", "message": f"internal error: {e}"}}
        accept = request.headers.get("accept")
        if status == 200 and _has_arrays(payload):  # PNG/npz encoding takes real CPU
            body, media = await state.pool.run(trace, "encode", encode_result, payload, accept)
        else:
            body, media = encode_result(payload, accept if status == 200 else None)
        trace.mark("encode")
        headers["Server-Timing"] = trace.server_timing()
        if state.draining:  # no keep-alive past a drain: clients reconnect elsewhere
            headers["Connection"] = "close"
        return Response(body, status_code=status, media_type=media, headers=headers)
    finally:
        state.leave()
        state.metrics.observe_request(label, status, trace.stages)


def _has_arrays(payload: dict[str, Any]) -> bool:
    return any(isinstance(v, np.ndarray) for v in payload.values())


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
        e = ModelNotFound(f"no model named {request.path_params['name']!r}")
        return _json(e.to_json(), 404)
    return _json(ms.describe())


async def list_pipelines(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    return _json({"pipelines": [p.describe() for p in state.pipelines.values()]})


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    not_ready = [n for n, t in {**state.models, **state.pipelines}.items() if not t.ready]
    if state.draining or not_ready:
        why = "draining" if state.draining else f"models not ready: {not_ready}"
        return _json({"ready": False, "reason": why}, 503)
    return _json({"ready": True, "models": list(state.models), "pipelines": list(state.pipelines)})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    for name, ms in state.models.items():
        state.metrics.queue_depth.labels(name).set(ms.inflight)
        state.metrics.busy_instances.labels(name).set(ms.batcher.busy_instances)
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    resp = _json({"error": {"kind": kind, "message": exc.detail}}, exc.status_code)
    resp.headers["Server-Timing"] = format_server_timing({"encode": 0.0})
    return resp


def create_app(
    config: ServerConfig,
    models: Mapping[str, ModelServer],
    pool: PreprocessPool,
    pipelines: Mapping[str, Any] | None = None,
    broker: Any = None,
) -> Starlette:
    """The ASGI app over already-loaded models and pipelines; startup warms the models and
    connects the pipelines to ``broker``, shutdown stops them."""
    state = ServerState(config, models, pool, pipelines)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        for ms in state.models.values():
            await loop.run_in_executor(None, ms.warm_up)
            ms.start()
        for p in state.pipelines.values():
            await p.start()
        log.info("ready: %s", ", ".join([*state.models, *state.pipelines]))
        try:
            yield
        finally:
            for p in state.pipelines.values():
                await p.stop()
            if broker is not None:
                await broker.close()
            for ms in state.models.values():
                ms.stop()
            pool.shutdown()

    routes = [
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
        Route("/v1/pipelines/{name}:predict", predict_pipeline, methods=["POST"]),
        Route("/v1/pipelines", _timed(list_pipelines), methods=["GET"]),
        Route("/v1/models", _timed(list_models), methods=["GET"]),
        Route("/v1/models/{name}", _timed(show_model), methods=["GET"]),
        Route("/healthz", _timed(healthz), methods=["GET"]),
        Route("/readyz", _timed(readyz), methods=["GET"]),
        Route("/metrics", _timed(metrics), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.cvserve = state
    return app

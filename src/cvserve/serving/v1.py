"""cvserve's own ``/v1`` HTTP door: ``POST /v1/models/{name}:predict`` and
``/v1/pipelines/{name}:predict`` take the image bytes as the body; ``GET /v1/models``,
``/v1/models/{name}`` and ``/v1/pipelines`` describe what is served.

It only translates: the body and query to a servable's ``predict`` through
:func:`cvserve.serving.door.handle`, and the answer or typed error back to a status and a
JSON (or PNG/npz, by ``Accept``) body, with ``Server-Timing``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cvserve.errors import RequestError
from cvserve.serving.core import Servable
from cvserve.serving.door import TIMEOUT_HEADER, handle, internal_message
from cvserve.serving.errors import NotServed, UnsupportedMediaType, http_status
from cvserve.serving.httpwire import json_response, read_body, timed
from cvserve.serving.state import ServerState
from cvserve.tasks.encode import encode_result
from cvserve.trace import Trace

__all__ = ["routes"]

_ACCEPTED_TYPES = ("image/", "application/octet-stream")


async def predict(request: Request) -> Response:
    """``POST /v1/models/{name}:predict``."""
    state: ServerState = request.app.state.cvserve
    return await _predict(request, state, state.models, "model")


async def predict_pipeline(request: Request) -> Response:
    """``POST /v1/pipelines/{name}:predict``."""
    state: ServerState = request.app.state.cvserve
    return await _predict(request, state, state.pipelines, "pipeline")


async def _predict(
    request: Request, state: ServerState, targets: Mapping[str, Servable], what: str
) -> Response:
    name = request.path_params["name"]

    def find() -> Servable:
        target = targets.get(name)
        if target is None:
            raise NotServed(
                f"no {what} named {name!r}; serving: {', '.join(targets) or 'none'}",
                **{f"{what}s": list(targets)},
            )
        return target

    async def receive() -> bytes:
        ctype = request.headers.get("content-type", "application/octet-stream").lower()
        if not ctype.startswith(_ACCEPTED_TYPES):
            raise UnsupportedMediaType(
                f"content-type {ctype!r}: send the image bytes as image/* or "
                "application/octet-stream"
            )
        return await read_body(request, state.config.max_body_bytes)

    async def run(target: Servable, data: bytes, trace: Trace, deadline: float):
        params = target.parse_params(request.query_params)
        pred = await target.predict(data, trace, deadline, params)
        payload = {
            what: name,
            "task": target.task,
            "image_size": list(pred.image_size),
            "batch_size": pred.batch_size,
            **pred.result,
        }
        return payload, 1

    encode = partial(_encode, accept=request.headers.get("accept"))
    answer = await handle(
        state, name, targets, find, receive, run, encode,
        timeout=request.headers.get(TIMEOUT_HEADER),
    )  # fmt: skip
    headers: dict[str, str] = {}
    if answer.error is None:
        body, media = answer.body
    else:
        body, media = encode_result(_error_payload(answer.error), None)
        if answer.retry_after_s is not None:
            headers["Retry-After"] = str(answer.retry_after_s)
    headers["Server-Timing"] = answer.trace.server_timing()
    return Response(body, status_code=answer.status, media_type=media, headers=headers)


def _encode(payload: dict[str, Any], accept: str | None) -> tuple[bytes, str]:
    return encode_result(payload, accept)


def _error_payload(e: BaseException) -> dict[str, Any]:
    if isinstance(e, RequestError):
        return e.to_json()
    return {"error": {"kind": "internal", "message": internal_message(e)}}


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    return json_response({"models": [ms.describe() for ms in state.models.values()]})


async def show_model(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    ms = state.models.get(request.path_params["name"])
    if ms is None:
        e = NotServed(f"no model named {request.path_params['name']!r}")
        return json_response(e.to_json(), http_status(e))
    return json_response(ms.describe())


async def list_pipelines(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    return json_response({"pipelines": [p.describe() for p in state.pipelines.values()]})


async def show_pipeline(request: Request) -> Response:
    """``GET /v1/pipelines/{name}``: its graph, and per step calls, batch sizes and time."""
    state: ServerState = request.app.state.cvserve
    p = state.pipelines.get(request.path_params["name"])
    if p is None:
        e = NotServed(f"no pipeline named {request.path_params['name']!r}")
        return json_response(e.to_json(), http_status(e))
    return json_response(p.describe())


def routes() -> list[Route]:
    """The ``/v1`` routes."""
    return [
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
        Route("/v1/pipelines/{name}:predict", predict_pipeline, methods=["POST"]),
        Route("/v1/pipelines", timed(list_pipelines), methods=["GET"]),
        Route("/v1/pipelines/{name}", timed(show_pipeline), methods=["GET"]),
        Route("/v1/models", timed(list_models), methods=["GET"]),
        Route("/v1/models/{name}", timed(show_model), methods=["GET"]),
    ]

"""cvserve's own ``/v1`` HTTP door: ``POST /v1/models/{name}:predict`` and
``/v1/pipelines/{name}:predict`` take the image bytes as the body, a multipart form or JSON
with base64 images (:mod:`cvserve.serving.v1_body`); ``GET /v1/models``,
``/v1/models/{name}`` and ``/v1/pipelines`` describe what is served; ``name@version``
addresses one loaded version of a model. The model repository
(:mod:`cvserve.serving.control`): ``GET /v1/repository``, ``POST
/v1/models/{name}:load`` and ``:unload``.

One image (raw bytes, one form file, ``{"image": ...}``) gets the usual answer; a list
(several form files, ``{"images": [...]}``) gets ``{"results": [answer, ...]}`` in the
order sent. Each image passes admission on its own; if any fails, the request answers
that error (its message names the image) and no partial list.

It only translates: the body and query to a servable's ``predict`` through
:func:`cvserve.serving.door.handle`, and the answer or typed error back to a status and a
JSON (or PNG/npz, by ``Accept``) body, with ``Server-Timing``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from functools import partial
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cvserve.errors import RequestError
from cvserve.serving.control import repository
from cvserve.serving.core import Servable
from cvserve.serving.door import TIMEOUT_HEADER, handle, internal_message
from cvserve.serving.errors import BadRequest, NotServed, http_status
from cvserve.serving.httpwire import json_response, read_body, timed
from cvserve.serving.state import ServerState
from cvserve.serving.v1_body import Images, parse_body
from cvserve.tasks.encode import encode_result
from cvserve.trace import Trace

__all__ = ["routes"]

_PREDICT = ":predict"
_POST_ONLY = (_PREDICT, ":load", ":unload")  # a GET on one of these is a 405
#: Bodies larger than this are parsed (a form, base64 JSON) in a thread, not on the loop.
_PARSE_INLINE_BYTES = 1 << 20


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
    name, _, version = request.path_params["name"].partition("@")

    def find() -> Servable:
        target = targets.get(name)
        if target is None:
            raise NotServed(
                f"no {what} named {name!r}; serving: {', '.join(targets) or 'none'}",
                **{f"{what}s": list(targets)},
            )
        return _version(state, target, version)

    async def receive() -> Images:
        body = await read_body(request, state.config.max_body_bytes)
        ctype = request.headers.get("content-type")
        if len(body) > _PARSE_INLINE_BYTES:  # base64 JSON: ~5 ms of CPU a MiB, off the loop
            return await asyncio.to_thread(parse_body, ctype, body)
        return parse_body(ctype, body)

    async def run(target: Servable, images: Images, trace: Trace, deadline: float):
        params = target.parse_params(request.query_params)

        async def one(data: bytes, t: Trace) -> dict[str, Any]:
            pred = await target.predict(data, t, deadline, params)
            return {
                what: name,
                "task": target.task,
                "image_size": list(pred.image_size),
                "batch_size": pred.batch_size,
                **pred.result,
            }

        if not images.many:
            return await one(images.items[0], trace), 1
        return {"results": await _each(images, one, trace)}, len(images.items)

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


async def _each(images: Images, one, trace: Trace) -> list[dict[str, Any]]:
    """Every image of a list at once (the batcher may batch them), each with its own trace;
    the request's Server-Timing is the slowest image's (the stages that made it wait)."""
    traces = [Trace(start=trace.last) for _ in images.items]
    outs = await asyncio.gather(
        *(one(data, t) for data, t in zip(images.items, traces, strict=True)),
        return_exceptions=True,
    )
    for i, out in enumerate(outs):
        if isinstance(out, RequestError):
            out.args = (f"{images.name(i)}: {out}",)
            raise out
        if isinstance(out, BaseException):
            raise out
    slowest = max(traces, key=lambda t: t.last)
    for stage, seconds in slowest.stages.items():
        trace.add(stage, seconds)
    trace.simulated = any(t.simulated for t in traces)
    trace.advance(slowest.last)
    return outs  # type: ignore[return-value]


def _encode(payload: dict[str, Any], accept: str | None) -> tuple[bytes, str]:
    return encode_result(payload, accept)


def _error_payload(e: BaseException) -> dict[str, Any]:
    if isinstance(e, RequestError):
        return e.to_json()
    return {"error": {"kind": "internal", "message": internal_message(e)}}


def _version(state: ServerState, target: Servable, version: str) -> Servable:
    """``name@version``: that loaded version of the model (404 when it is not loaded);
    no version: the newest loaded."""
    if not version or version == getattr(target, "version", "1"):
        return target
    loaded = state.versions.get(target.name, {})
    found = loaded.get(version)
    if found is None:
        raise NotServed(
            f"model {target.name!r} has no version {version!r} loaded; versions: "
            f"{', '.join(loaded) or 'none'}",
            versions=list(loaded),
        )
    return found


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: every loaded version of every model, with its memory."""
    state: ServerState = request.app.state.cvserve
    models = [ms.describe() for loaded in state.versions.values() for ms in loaded.values()]
    return json_response({"models": models})


async def show_model(request: Request) -> Response:
    """``GET /v1/models/{name}`` or ``{name}@{version}``."""
    state: ServerState = request.app.state.cvserve
    if request.path_params["name"].endswith(_POST_ONLY):  # GET on a POST route
        raise HTTPException(405, headers={"Allow": "POST"})
    name, _, version = request.path_params["name"].partition("@")
    try:
        ms = state.models.get(name)
        if ms is None:
            raise NotServed(f"no model named {name!r}")
        return json_response(_version(state, ms, version).describe())
    except RequestError as e:
        return json_response(e.to_json(), http_status(e))


async def repository_index(request: Request) -> Response:
    """``GET /v1/repository``: every model version loaded, loading, or in the store or
    the config and not loaded (with why)."""
    state: ServerState = request.app.state.cvserve
    try:
        rows = repository(state).index()
    except RequestError as e:
        return json_response(e.to_json(), http_status(e))
    return json_response({"mode": state.config.model_control,
                          "models": [r.to_json() for r in rows]})  # fmt: skip


async def load_model(request: Request) -> Response:
    """``POST /v1/models/{name}:load``: an optional JSON body of the model's settings
    (a config file's model entry: ``max_batch_size``, ``version_policy`` ...)."""
    state: ServerState = request.app.state.cvserve
    name = request.path_params["name"]
    try:
        body = await read_body(request, state.config.max_body_bytes)
        override = None
        if body.strip():
            try:
                override = json.loads(body)
            except ValueError as e:
                raise BadRequest(f"the body must be a JSON object of model settings: {e}") from None
        versions = await repository(state).load(name, override)
    except RequestError as e:
        return json_response(e.to_json(), http_status(e))
    return json_response({"model": name, "versions": versions, "state": "READY"})


async def unload_model(request: Request) -> Response:
    """``POST /v1/models/{name}:unload``: every version; admitted requests finish first."""
    state: ServerState = request.app.state.cvserve
    name = request.path_params["name"]
    try:
        await repository(state).unload(name)
    except RequestError as e:
        return json_response(e.to_json(), http_status(e))
    return json_response({"model": name, "state": "UNAVAILABLE"})


async def list_pipelines(request: Request) -> Response:
    state: ServerState = request.app.state.cvserve
    return json_response({"pipelines": [p.describe() for p in state.pipelines.values()]})


async def show_pipeline(request: Request) -> Response:
    """``GET /v1/pipelines/{name}``: its graph, and per step calls, batch sizes and time."""
    state: ServerState = request.app.state.cvserve
    if request.path_params["name"].endswith(_PREDICT):  # GET on the predict route
        raise HTTPException(405, headers={"Allow": "POST"})
    p = state.pipelines.get(request.path_params["name"])
    if p is None:
        e = NotServed(f"no pipeline named {request.path_params['name']!r}")
        return json_response(e.to_json(), http_status(e))
    return json_response(p.describe())


def routes() -> list[Route]:
    """The ``/v1`` routes."""
    return [
        Route("/v1/models/{name}" + _PREDICT, predict, methods=["POST"]),
        Route("/v1/pipelines/{name}" + _PREDICT, predict_pipeline, methods=["POST"]),
        Route("/v1/models/{name}:load", timed(load_model), methods=["POST"]),
        Route("/v1/models/{name}:unload", timed(unload_model), methods=["POST"]),
        Route("/v1/repository", timed(repository_index), methods=["GET"]),
        Route("/v1/pipelines", timed(list_pipelines), methods=["GET"]),
        Route("/v1/pipelines/{name}", timed(show_pipeline), methods=["GET"]),
        Route("/v1/models", timed(list_models), methods=["GET"]),
        Route("/v1/models/{name}", timed(show_model), methods=["GET"]),
    ]

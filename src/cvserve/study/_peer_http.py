"""The HTTP pieces both peer servers share (run in the peer's child process): the
read-only model routes a bench probes, and ``Server-Timing`` that adds up to the front's
total time. Used by :mod:`cvserve.study._litserve` and :mod:`cvserve.study._rayserve`."""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["TimingMiddleware", "describe_routes", "timed_response"]


def describe_routes(model_info: dict[str, Any], name: str):
    """Starlette routes for the read-only endpoints a bench probes."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    def js(obj: Any, status: int = 200) -> Response:
        return Response(json.dumps(obj), status, media_type="application/json")

    async def list_models(request: Request) -> Response:
        return js({"models": [model_info]})

    async def show_model(request: Request) -> Response:
        if request.path_params["model"] != name:
            return js({"error": {"kind": "not_found", "message": "no such model"}}, 404)
        return js(model_info)

    return [Route("/v1/models", list_models), Route("/v1/models/{model}", show_model)]


class TimingMiddleware:
    """Pure ASGI: completes the worker's ``Server-Timing`` with ``recv`` (reading the
    body) and ``queue`` (everything else the front spent: its queue to the worker, the
    hops back), so the stages add up to the front's total time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        t_recv = t0

        async def timed_receive():
            nonlocal t_recv
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body"):
                t_recv = time.perf_counter()
            return message

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                message = _complete_timing(message, t0, t_recv)
            await send(message)

        await self.app(scope, timed_receive, timed_send)


def _complete_timing(message: dict, t0: float, t_recv: float) -> dict:
    from cvserve.trace import format_server_timing, parse_server_timing

    headers = list(message.get("headers", []))
    idx = [i for i, (k, _) in enumerate(headers) if k.lower() == b"server-timing"]
    if not idx:
        return message
    stages, _ = parse_server_timing(headers[idx[0]][1].decode("latin-1"))
    recv = max(0.0, t_recv - t0)
    total = time.perf_counter() - t0
    timing = {"recv": recv, **stages}
    timing["queue"] = max(0.0, total - sum(timing.values()))
    headers[idx[0]] = (b"server-timing", format_server_timing(timing).encode("latin-1"))
    return {**message, "headers": headers}


def timed_response(result: dict, stages: dict[str, float]):
    """``result`` as JSON with a ``Server-Timing`` header of ``stages`` plus ``encode``."""
    from starlette.responses import Response

    from cvserve.trace import format_server_timing

    t = time.perf_counter()
    body = json.dumps(result).encode()
    stages = {**stages, "encode": time.perf_counter() - t}
    return Response(body, media_type="application/json",
                    headers={"Server-Timing": format_server_timing(stages)})  # fmt: skip

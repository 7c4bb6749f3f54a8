"""A stand-in server that speaks cvserve's predict contract without doing any work.

It answers like the real server (JSON body with ``batch_size``, a ``Server-Timing``
header from :func:`cvserve.trace.format_server_timing`) so the load generator can be
tested offline and its own ceiling measured against a trivial endpoint. The model name
picks a behaviour:

- ``echo``: always 200.
- ``flaky``: every third request answers 500.
- ``busy``: every other request answers 429 with ``Retry-After: 0``.
- ``garbled``: 200 with one malformed entry appended to ``Server-Timing``.
- ``slow``: 200 after one second (to exercise client timeouts).
- anything else: 404.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cvserve.trace import Trace

MODELS: tuple[str, ...] = ("echo", "flaky", "busy", "garbled", "slow")

__all__ = ["MODELS", "create_app", "serve_in_thread"]


def create_app(delay: float = 0.0) -> Starlette:
    """The fake server; ``delay`` seconds of ``asyncio.sleep`` stand in for inference."""
    counter = itertools.count()

    async def predict(request: Request) -> Response:
        trace = Trace()
        model = request.path_params["model"]
        body = await request.body()
        trace.mark("recv")
        n = next(counter)
        if model not in MODELS:
            return JSONResponse({"error": f"model {model!r} not found"}, 404)
        if model == "flaky" and n % 3 == 2:
            trace.mark("infer")
            headers = {"Server-Timing": trace.server_timing()}
            return JSONResponse({"error": "injected failure"}, 500, headers=headers)
        if model == "busy" and n % 2 == 1:
            headers = {"Server-Timing": trace.server_timing(), "Retry-After": "0"}
            return JSONResponse({"error": "queue full", "limit": 0}, 429, headers=headers)
        trace.mark("queue")
        if delay or model == "slow":
            await asyncio.sleep(1.0 if model == "slow" else delay)
        trace.mark("batch_wait")
        trace.mark("infer")
        trace.mark("postprocess")
        payload = {
            "model": model,
            "task": "classify",
            "top_k": [{"label": "tabby", "score": 0.5}],
            "image_size": [len(body), 1],
            "batch_size": 1 + n % 4,
        }
        trace.mark("encode")
        timing = trace.server_timing()
        if model == "garbled":
            timing += ", bogus;dur=oops"
        return JSONResponse(payload, headers={"Server-Timing": timing})

    async def readyz(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def models(request: Request) -> Response:
        return JSONResponse({"models": [{"name": m, "task": "classify"} for m in MODELS]})

    return Starlette(
        routes=[
            Route("/v1/models/{model}:predict", predict, methods=["POST"]),
            Route("/v1/models", models),
            Route("/readyz", readyz),
        ]
    )


@contextmanager
def serve_in_thread(delay: float = 0.0, host: str = "127.0.0.1") -> Iterator[str]:
    """Run the fake server with uvicorn in a thread on a free port; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(delay), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:  # poll readiness: never a fixed sleep
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1.0) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("fake server did not start") from None
                time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

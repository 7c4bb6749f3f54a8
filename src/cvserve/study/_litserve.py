"""The baseline model behind LitServe (see :mod:`cvserve.study.peers`); imports litserve.

No ``from __future__ import annotations`` here: LitServe reads ``decode_request``'s
annotation as a live object to build its FastAPI route.
"""

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
from fastapi import Body, HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from cvserve.study._peer_http import TimingMiddleware, describe_routes, timed_response
from cvserve.study.baseline import BaselineModel


class BaselineAPI(ls.LitAPI):
    """Preprocess in ``decode_request``, infer in ``predict``, postprocess in
    ``encode_response``: the stages LitServe's worker loop runs for each request.

    Module level, since LitServe pickles it into a spawned worker process."""

    def __init__(self, onnx: str, name: str, meta: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.onnx, self.name, self.meta = onnx, name, meta

    def setup(self, device: str) -> None:
        self.model = BaselineModel(self.onnx, self.name, meta_path=self.meta)

    # The raw image as the body (LitServe's default would parse JSON).
    def decode_request(self, request: Annotated[bytes, Body()], **kw: Any) -> Any:
        try:
            return self.model.preprocess(request)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    def predict(self, x: Any, **kw: Any) -> Any:
        batch, size, stages = x
        t0 = time.perf_counter()
        logits = self.model.infer(batch)
        return logits, size, {**stages, "infer": time.perf_counter() - t0}

    def encode_response(self, output: Any, **kw: Any) -> Any:
        logits, size, stages = output
        t0 = time.perf_counter()
        result = self.model.postprocess(logits, size)
        return timed_response(result, {**stages, "postprocess": time.perf_counter() - t0})


async def _error(request: Request, exc: HTTPException) -> JSONResponse:
    """LitServe's errors in cvserve's JSON shape."""
    kind = {400: "bad_request", 404: "not_found", 504: "timeout"}.get(exc.status_code, "error")
    return JSONResponse({"error": {"kind": kind, "message": str(exc.detail)}}, exc.status_code)


def run(onnx: str, name: str, host: str, port: int, meta: str | None) -> None:
    """Serve until SIGTERM/SIGINT (blocks)."""
    info = BaselineModel(onnx, name, meta_path=meta).describe("litserve")  # fails fast
    api = BaselineAPI(
        str(Path(onnx).resolve()),
        name,
        meta,
        max_batch_size=1,
        api_path=f"/v1/models/{name}:predict",
    )
    server = ls.LitServer(
        api,
        accelerator="cpu",
        devices=1,
        workers_per_device=1,
        healthcheck_path="/readyz",
        middlewares=[TimingMiddleware],
    )
    server.app.router.routes.extend(describe_routes(info, name))
    server.app.add_exception_handler(HTTPException, _error)

    # LitServer.run stops its workers on KeyboardInterrupt; SIGTERM would otherwise kill
    # this process alone and orphan them. Its forked API server inherits the handler and
    # re-raises the signal after its own shutdown: there it must just return.
    main_pid = os.getpid()

    def shutdown(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    server.run(host=host, port=port, log_level="warning", generate_client_file=False)

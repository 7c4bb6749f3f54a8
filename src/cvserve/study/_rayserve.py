"""The baseline model behind Ray Serve (see :mod:`cvserve.study.peers`); imports ray."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import ray
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from cvserve.study._peer_http import timed_response
from cvserve.study.baseline import BaselineModel, error_body, top_k_param


def _json(body: bytes | str, status: int = 200) -> Response:
    return Response(body, status, media_type="application/json")


@serve.deployment(num_replicas=1)
class BaselineDeployment:
    """One replica answering the baseline's URLs; the handler runs in a thread, as the
    baseline's does, so the replica's event loop keeps taking requests."""

    def __init__(self, onnx: str, name: str, meta: str | None) -> None:
        self.name = name
        self.model = BaselineModel(onnx, name, meta_path=meta)
        self.info = self.model.describe("ray-serve")

    async def __call__(self, request: Request) -> Response:
        path, name = request.url.path, self.name
        if request.method == "POST" and path == f"/v1/models/{name}:predict":
            return await self._predict(request)
        if request.method == "GET":
            if path in ("/readyz", "/healthz"):
                return _json(json.dumps({"ready": True, "models": [name]}))
            if path == "/v1/models":
                return _json(json.dumps({"models": [self.info]}))
            if path == f"/v1/models/{name}":
                return _json(json.dumps(self.info))
        return _json(error_body("not_found", f"no route {request.method} {path}"), 404)

    async def _predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        data = await request.body()
        t1 = time.perf_counter()
        try:
            top_k = top_k_param(request.query_params)
            result, stages = await run_in_threadpool(self.model.handle, data, top_k)
        except ValueError as e:  # an undecodable image or a bad top_k
            return _json(error_body("bad_request", str(e)), 400)
        # The time from the proxy to this replica is not seen here: the study shows it
        # as "unreported" (the client's latency beyond the reported stages).
        timing = {"recv": t1 - t0, **stages}
        timing["queue"] = max(0.0, time.perf_counter() - t0 - sum(timing.values()))
        return timed_response(result, timing)


def run(onnx: str, name: str, host: str, port: int, meta: str | None) -> None:
    """Start a local Ray instance and serve until SIGTERM/SIGINT (blocks)."""
    BaselineModel(onnx, name, meta_path=meta)  # fail fast, before Ray starts
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        object_store_memory=128 * 1024 * 1024,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",  # Ray's daemons talk over loopback only
    )
    # After ray.init, whose core worker installs a SIGTERM handler that aborts the process
    # (and before serve.run: the replica may answer /readyz before serve.run returns).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(BaselineDeployment.bind(onnx, name, meta), name=name, route_prefix="/")
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

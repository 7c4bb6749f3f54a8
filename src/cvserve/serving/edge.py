"""What every HTTP request passes before and after a door's route (a pure ASGI middleware):

- a request id: the client's ``X-Request-Id`` or a new one, echoed on every response;
- the API key check (:mod:`cvserve.serving.auth`), health and readiness left open;
- the server-wide readiness gate: while the models load, work gets 503 ``loading``; while
  loading or shutting down, every readiness route (``/v2/health/ready``, a model's
  ``/ready``) answers not ready, whatever the model says;
- ``Connection: close`` on every response once shutdown has begun, so keep-alive clients
  reconnect (elsewhere) instead of finding their connection closed under them;
- one log line per failed request (:func:`cvserve.serving.logs.log_failure`).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from cvserve.serving import logs
from cvserve.serving.auth import DENIED, OPEN_PATHS, ApiKeys

if TYPE_CHECKING:
    from cvserve.serving.state import ServerState

__all__ = ["Edge"]

#: Answered while the models load (liveness, readiness, metrics); everything else is 503.
_WHILE_LOADING = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live"})
_READINESS = re.compile(r"^/v2/(health/ready|models/[^/]+(/versions/[^/]+)?/ready)$")
_MODEL = re.compile(r"^/v[12]/(?:models|pipelines)/([^/:]+)")
#: Error bodies longer than this are not parsed for the log line.
_MAX_ERROR_BODY = 64 * 1024
#: ``kind`` of an error whose body does not name one (KServe v2's ``{"error": "..."}``).
_KIND = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
    429: "overloaded", 499: "client_closed_request", 500: "internal", 503: "unavailable", 504: "deadline_exceeded",
}  # fmt: skip


def _body(path: str, status: int, kind: str, message: str) -> tuple[bytes, str]:
    if path.startswith("/v2"):
        payload: dict[str, Any] = (
            {"ready": False} if kind == "not_ready" else {"error": message}
        )  # KServe v2's shapes
    else:
        payload = {"error": {"kind": kind, "message": message}}
    return json.dumps(payload, separators=(",", ":")).encode(), kind


def _error_fields(body: bytes, status: int) -> tuple[str | None, str | None]:
    """``kind`` and ``message`` of an error body (either door's JSON shape)."""
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return _KIND.get(status), body[:200].decode("utf-8", "replace") or None
    if isinstance(err, dict):
        return err.get("kind") or _KIND.get(status), err.get("message")
    return _KIND.get(status), str(err)


class Edge:
    """The middleware over ``app`` (see the module docstring); ``keys`` None: no API keys."""

    def __init__(self, app: Any, state: ServerState, keys: ApiKeys | None = None) -> None:
        self.app = app
        self.state = state
        self.keys = keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = auth = parent = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v
            elif k == b"authorization":
                auth = v
            elif k == b"traceparent":
                parent = v
        rec, token = logs.start_request(rid)
        rec.traceparent = parent
        path: str = scope["path"]
        state = self.state
        status = 0
        error_body = bytearray()

        async def send_(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(b"x-request-id", rec.id.encode()), *message.get("headers", ())]
                if state.stopping and not any(k.lower() == b"connection" for k, _ in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                if status >= 400 and len(error_body) < _MAX_ERROR_BODY:
                    error_body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    self._finished(rec, path, status, bytes(error_body))
            await send(message)

        try:
            early = self._refuse(path, auth)
            if early is None:
                await self.app(scope, receive, send_)
            else:
                code, kind, message, extra = early
                if kind != "not_ready":  # a readiness probe's "no" is an answer
                    state.metrics.edge_refusals.labels(str(code), kind).inc()
                body, _ = _body(path, code, kind, message)
                headers = [(b"content-type", b"application/json"),
                           (b"content-length", str(len(body)).encode()), *extra]  # fmt: skip
                await send_({"type": "http.response.start", "status": code, "headers": headers})
                await send_({"type": "http.response.body", "body": body})
        finally:
            logs.end_request(token)

    def _refuse(self, path: str, auth: bytes | None):
        """``(status, kind, message, headers)`` when the edge answers itself, else None."""
        if self.keys is not None and path not in OPEN_PATHS:
            denied = self.keys.check(auth)
            if denied is not None:
                kind, message = DENIED[denied]
                extra = [(b"www-authenticate", b"Bearer")] if denied == 401 else []
                return denied, kind, message, extra
        state = self.state
        phase = state.phase_not_ready()  # readiness is the state's to say (serving.state)
        if phase is not None and _READINESS.match(path):
            why = "loading its models" if phase == "loading" else "shutting down"
            return 503, "not_ready", f"the server is {why}", []
        if state.loading and path not in _WHILE_LOADING:
            return (
                503,
                "loading",
                "the server is loading its models; retry shortly",
                [(b"retry-after", b"1")],
            )
        return None

    def _finished(self, rec: logs.RequestLog, path: str, status: int, body: bytes) -> None:
        m = _MODEL.match(path)
        model = m.group(1) if m else None
        if status >= 400 and not (path == "/readyz" or _READINESS.match(path)):
            # a readiness probe answered "not ready" is an answer, not a failure
            kind, message = _error_fields(body, status)
            logs.log_failure(
                rec, door="http", status=status, model=model, kind=kind, message=message
            )
        elif rec.warnings:
            logs.log_warnings(rec, door="http", model=model, status=status)

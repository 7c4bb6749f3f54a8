"""The errors a cvserve server answers with, one class per status, each carrying the
server's own message and details (``kind``, limits), and the request id to look up in the
server's log."""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "BadRequest",
    "CvserveError",
    "GatewayTimeout",
    "MethodNotAllowed",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "Unreachable",
    "UnsupportedMediaType",
    "error_for",
]


class CvserveError(Exception):
    """An answer that is not a result (``status`` its HTTP status, ``kind`` the server's
    name for it, ``detail`` the rest of its JSON error: limits and facts), or no answer
    (:class:`Unreachable`, ``status`` None)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        kind: str | None = None,
        detail: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.detail = detail or {}
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status}: {self.message}"


class BadRequest(CvserveError):
    """400: an image that cannot be decoded, a bad parameter, a malformed form."""


class Unauthorized(CvserveError):
    """401 (no API key) or 403 (a key the server does not accept)."""


class NotFound(CvserveError):
    """404: no model or pipeline by that name (``detail`` lists what is served)."""


class MethodNotAllowed(CvserveError):
    """405."""


class PayloadTooLarge(CvserveError):
    """413: the body (``detail['max_body_bytes']``) or the image (``max_pixels``)."""


class UnsupportedMediaType(CvserveError):
    """415: an image format or content type the server does not take."""


class Overloaded(CvserveError):
    """429: the server refused the request to keep its latency; ``retry_after`` is the
    seconds it asks to wait (its ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(CvserveError):
    """500: a fault of the server's (its log line has the traceback)."""


class ServiceUnavailable(CvserveError):
    """503: loading its models, shutting down, or its broker is down; ``retry_after``
    when the server gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class GatewayTimeout(CvserveError):
    """504: the request's deadline passed (``deadline_ms`` or the model's timeout)."""


class Unreachable(CvserveError):
    """No answer: the connection failed or the client's own timeout passed."""


_BY_STATUS: dict[int, type[CvserveError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: Overloaded,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}


def error_for(status: int, body: bytes, headers: Any) -> CvserveError:
    """The typed error of an answer with ``status`` (>= 400), from its JSON body
    (``{"error": {"kind", "message", ...}}``, or KServe v2's ``{"error": "..."}``)."""
    kind, message, detail = None, "", {}
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body[:300].decode("utf-8", "replace").strip()
    else:
        if isinstance(err, dict):
            detail = dict(err)
            kind = detail.pop("kind", None)
            message = str(detail.pop("message", ""))
        else:
            message = str(err)
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else CvserveError)
    kw: dict[str, Any] = {
        "status": status,
        "kind": kind,
        "detail": detail,
        "request_id": headers.get("x-request-id"),
    }
    if cls in (Overloaded, ServiceUnavailable):
        kw["retry_after"] = _seconds(headers.get("retry-after"))
    return cls(message or f"HTTP {status}", **kw)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from a server; the caller picks its own wait

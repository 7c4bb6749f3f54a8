"""The base of every error a request can cause: a message, an HTTP status and details.

Each package defines its own errors beside the code that raises them; the HTTP edge
(``serving.door``) turns any of them into one JSON answer with ``status``.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """An error that answers one request; ``detail`` holds limits and other facts."""

    status = 500
    kind = "internal"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": str(self), **self.detail}}

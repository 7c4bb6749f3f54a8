"""What both HTTP doors (``/v1`` and KServe v2) read and write the same way: the body under
its limit, a client that hangs up mid-body, JSON responses, the timing of routes that only
describe the server."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from cvserve.serving.errors import BodyTooLarge, ClientGone
from cvserve.trace import format_server_timing

__all__ = ["byte_count", "json_response", "read_body", "timed"]


def byte_count(raw: str | None) -> int | None:
    """A header's byte count: plain ASCII digits only (``str.isdigit`` also accepts ``²``,
    which ``int`` refuses), else None."""
    if raw is None:
        return None
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() else None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 past ``limit`` bytes (declared or streamed); a client that
    hangs up before the end is :class:`ClientGone` (499), not a server fault."""
    declared = byte_count(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise BodyTooLarge(
            f"request body is {declared} bytes; the limit is {limit}", max_body_bytes=limit
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(
                    f"request body exceeds the limit of {limit} bytes", max_body_bytes=limit
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"the client hung up after {size} bytes of the body") from None
    return b"".join(chunks)


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def timed(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Routes that only describe the server: their whole time is the response (``encode``)."""

    async def wrapped(request: Request) -> Response:
        t0 = time.perf_counter()
        resp = await handler(request)
        resp.headers["Server-Timing"] = format_server_timing({"encode": time.perf_counter() - t0})
        return resp

    return wrapped

"""A Python client of a cvserve server's ``/v1`` routes, on httpx::

    from cvserve.client import Client

    with Client("http://127.0.0.1:8000") as c:
        answer = c.predict("resnet18", "photo.jpg", params={"top_k": 3})
        print(answer.result["top_k"], answer.timings)  # stage -> ms, from Server-Timing

An image is a path, bytes, a PIL image or a uint8 array. A refusal raises its typed error
(:mod:`cvserve.client.errors`: ``Overloaded`` with ``retry_after``, ``GatewayTimeout``,
``PayloadTooLarge`` ...) with the server's message. :class:`AsyncClient` is the asyncio
twin. It talks over the wire only, as ``cvserve bench`` does.
"""

from cvserve.client._clients import AsyncClient, Client
from cvserve.client._wire import Answer
from cvserve.client.errors import (
    BadRequest,
    CvserveError,
    GatewayTimeout,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    Unreachable,
    UnsupportedMediaType,
)

__all__ = [
    "Answer",
    "AsyncClient",
    "BadRequest",
    "Client",
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
]

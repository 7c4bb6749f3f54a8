"""Every error the server itself answers a request with, in one place.

The hierarchy (each class's ``status`` is its HTTP status, ``kind`` the machine-readable
name in the JSON body)::

    cvserve.errors.RequestError                      any error that answers one request
    ├── cvserve.images.decode.ImageError ...         400/413/415, raised while decoding
    ├── cvserve.tasks.params.ParamError        400   a task parameter out of its bounds
    └── ServingError                                 raised by the serving core
        ├── BadRequest             400  bad_request             a header or body it cannot use
        ├── ClientGone             499  client_closed_request   the client hung up mid-request
        ├── NotServed              404  model_not_found         no model or pipeline by that name
        ├── BodyTooLarge           413  body_too_large
        ├── UnsupportedMediaType   415  unsupported_media_type
        ├── Overloaded             429  overloaded              with ``retry_after_s``
        ├── Draining               503  draining                shutting down
        ├── BrokerDown             503  broker_unavailable
        ├── DeadlineExceeded       504  deadline_exceeded
        ├── LoadFailed             400  load_failed             a model load the API asked for failed
        ├── ModelTooLarge          507  insufficient_memory     a load that would not fit in memory
        ├── InferenceFailed        500  inference_failed        the runtime failed on a batch
        └── StageFailed            500  stage_failed            a pipeline stage failed

The edge (``serving/edge.py``, in front of both HTTP doors and of the app) answers three
more before a request reaches the core, as plain answers, not exceptions: 401
``unauthorized`` and 403 ``forbidden`` (API keys, ``serving/auth.py``), and 503
``loading`` (the port is bound, the models are not loaded yet).

Errors of other packages stay beside the code that raises them (images, tasks); what a
front door answers for any of them is decided once per door: the HTTP doors use
``status`` (:func:`http_status`), a gRPC door maps ``status`` to its own codes.
"""

from __future__ import annotations

from typing import Any

from cvserve.errors import RequestError

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "BrokerDown",
    "ClientGone",
    "DeadlineExceeded",
    "Draining",
    "InferenceFailed",
    "LoadFailed",
    "ModelTooLarge",
    "NotServed",
    "Overloaded",
    "ServingError",
    "StageFailed",
    "UnsupportedMediaType",
    "http_status",
]


class ServingError(RequestError):
    """Base of the errors the serving core raises."""


class BadRequest(ServingError):
    status = 400
    kind = "bad_request"


class ClientGone(ServingError):
    """The client hung up before its request was read: its doing, not the server's. Counted
    as 499 (nginx's "client closed request"); nobody is left to read an answer."""

    status = 499
    kind = "client_closed_request"


class NotServed(ServingError):
    status = 404
    kind = "model_not_found"


class BodyTooLarge(ServingError):
    status = 413
    kind = "body_too_large"


class UnsupportedMediaType(ServingError):
    status = 415
    kind = "unsupported_media_type"


class Overloaded(ServingError):
    status = 429
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int, **detail: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **detail)
        self.retry_after_s = retry_after_s


class Draining(ServingError):
    status = 503
    kind = "draining"


class BrokerDown(ServingError):
    status = 503
    kind = "broker_unavailable"


class DeadlineExceeded(ServingError):
    status = 504
    kind = "deadline_exceeded"


class InferenceFailed(ServingError):
    """The runtime failed on a batch: a server fault, not the client's."""

    status = 500
    kind = "inference_failed"


class StageFailed(ServingError):
    status = 500
    kind = "stage_failed"


class LoadFailed(ServingError):
    """A load or unload the repository API asked for cannot be done (not in the store, its
    file fails to open, model control is off); what is served is untouched."""

    status = 400
    kind = "load_failed"


class ModelTooLarge(ServingError):
    """A load whose estimated memory would not fit; what is served is untouched."""

    status = 507
    kind = "insufficient_memory"


def http_status(error: BaseException) -> int:
    """The HTTP status an error answers with (500 for anything not a request error)."""
    return error.status if isinstance(error, RequestError) else 500

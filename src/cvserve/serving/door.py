"""The per-request rules every front door shares, in one place: :func:`handle`.

A door (``/v1`` HTTP in :mod:`cvserve.serving.v1`, KServe v2 HTTP and gRPC in
:mod:`cvserve.serving.v2`) only translates its wire format: it hands :func:`handle` how to
read its request, how to run it against the servable, and how to encode the result, and
turns the :class:`Answer` (a result, or a typed error with its status) back into its wire
format with its one mapping (:mod:`cvserve.serving.errors`). Everything else is here:

- the in-flight count (what a drain waits for) and the draining check (503);
- the lookup of the servable (404), and the request's label in metrics;
- the deadline rule: the client's own timeout (``X-Timeout-Ms``, a gRPC deadline) or the
  servable's default;
- reading the request charged to ``recv``; heavy encoding (masks, depth maps) on the
  preprocessing pool, charged to ``encode``;
- typed errors to a status; a client that hung up is its own (499), a server fault is a 500
  whose traceback goes with the request's log line (the edges write that line);
- metrics and statistics of every answered request.

Request ids and the one log line per failed request belong to the edges
(:mod:`cvserve.serving.edge`, :mod:`cvserve.serving.v2.edge`), which run before the doors.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cvserve import otel
from cvserve.errors import RequestError
from cvserve.serving import logs
from cvserve.serving.core import Servable, remaining
from cvserve.serving.errors import BadRequest, ClientGone, Draining, http_status
from cvserve.serving.state import ServerState
from cvserve.trace import Trace

__all__ = ["CLIENT_CLOSED", "TIMEOUT_HEADER", "Answer", "deadline_s", "handle", "internal_message"]

log = logging.getLogger(__name__)

#: Request header (HTTP doors) that overrides the servable's default deadline, in ms.
TIMEOUT_HEADER = "x-timeout-ms"
#: Status counted for a request whose client went away (nginx's "client closed request").
CLIENT_CLOSED = ClientGone.status
#: A cancelled call this close to its deadline timed out (gRPC cancels by its own clock).
_DEADLINE_SLACK_S = 0.01

R = TypeVar("R")
E = TypeVar("E")


@dataclass
class Answer(Generic[E]):
    """What :func:`handle` made of one request: ``body`` (the door's encoding of the
    result) when ``status`` is 200, else ``error``."""

    status: int
    trace: Trace
    body: E | None = None
    error: BaseException | None = None

    @property
    def retry_after_s(self) -> int | None:
        """Seconds a refused (429) client should wait, else None."""
        return getattr(self.error, "retry_after_s", None) if self.status == 429 else None

    @property
    def message(self) -> str:
        """The error's message for the client ("" when it succeeded)."""
        return "" if self.error is None else internal_message(self.error)


def internal_message(e: BaseException) -> str:
    """What the client reads of an error: a request error's own message, else it is ours."""
    return str(e) if isinstance(e, RequestError) else f"internal error: {e}"


def deadline_s(timeout: str | float | None, default_ms: float) -> float:
    """A request's time budget in seconds: ``timeout`` as the ``X-Timeout-Ms`` header's
    text (str), as the client's own deadline in seconds (float, a gRPC deadline), or the
    servable's ``default_ms`` (None)."""
    if timeout is None:
        return default_ms / 1000.0
    if not isinstance(timeout, str):
        return float(timeout)
    try:
        ms = float(timeout)
    except ValueError:
        ms = -1.0
    if not 0 < ms <= 3_600_000:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds in (0, 3600000]")
    return ms / 1000.0


async def handle(
    state: ServerState,
    name: str,
    targets: Mapping[str, Servable],
    find: Callable[[], Servable],
    receive: Callable[[], Awaitable[R]],
    run: Callable[[Servable, R, Trace, float], Awaitable[tuple[Any, int]]],
    encode: Callable[[Any], E],
    *,
    timeout: str | float | None = None,
) -> Answer[E]:
    """One request through the rules above.

    ``targets``: what ``name`` is looked up in (a name not there is labelled ``_unknown``);
    ``find()`` returns the servable or raises (404, or a version it does not serve);
    ``receive()`` reads the request (charged to ``recv``); ``run(servable, received, trace,
    deadline)`` runs it through the core and returns ``(result, images)``; ``encode(result)``
    is the door's answer body (on the pool for a heavy servable). ``timeout``: see
    :func:`deadline_s`."""
    trace = Trace()
    target = targets.get(name)
    label = name if target is not None else "_unknown"
    rec = logs.current()
    span = otel.request_span(label, rec and rec.traceparent, trace) if otel.enabled() else None
    status, images = 200, 1
    body: E | None = None
    error: BaseException | None = None
    deadline = math.inf
    state.enter()
    try:
        try:
            if state.draining:
                raise Draining("server is shutting down; retry on another replica")
            target = find()
            received = await receive()
            trace.mark("recv")
            deadline = trace.start + deadline_s(timeout, target.timeout_ms)
            result, images = await run(target, received, trace, deadline)
            if target.heavy:  # masks, depth maps, PNG/npz: real CPU to encode
                body = await state.pool.submit(
                    trace, encode, result, deadline=math.inf, stage="encode"
                )
            else:
                body = encode(result)
        except RequestError as e:
            status, error = http_status(e), e
            log.debug("%s: %s %s", name, status, e)
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            status = 504 if remaining(deadline) < _DEADLINE_SLACK_S else CLIENT_CLOSED
            raise
        except Exception as e:  # a server fault: answer it, keep serving
            status, error = 500, e
            rec = logs.current()
            if rec is not None:
                rec.exc = e  # its traceback goes with the request's log line
            else:
                log.exception("%s: internal error", name)
        trace.mark("encode")
        return Answer(status, trace, body, error)
    finally:
        state.leave()
        state.observe(label, target, status, trace, images)
        if span is not None:
            span.finish(status, {"cvserve.model": label, "cvserve.images": images})

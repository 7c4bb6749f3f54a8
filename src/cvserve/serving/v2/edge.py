"""What every gRPC call passes before the KServe v2 service (a server interceptor), as
:mod:`cvserve.serving.edge` does for HTTP:

- a request id: the ``x-request-id`` metadata or a new one, echoed in the initial metadata;
- the API key check: ``authorization: Bearer KEY`` metadata; none: UNAUTHENTICATED, a
  wrong one: PERMISSION_DENIED; ServerLive and ServerReady stay open; checked before the
  message is read (a keyless call's message never is); a message that does not parse is
  INVALID_ARGUMENT;
- the server-wide readiness gate: while loading or shutting down, ServerReady and
  ModelReady answer not ready; while loading, other calls get UNAVAILABLE;
- one log line per failed call (:func:`cvserve.serving.logs.log_failure`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from cvserve.serving import logs
from cvserve.serving.auth import DENIED, ApiKeys
from cvserve.serving.v2.proto import inference_pb2 as pb
from cvserve.trace import Trace

if TYPE_CHECKING:
    from cvserve.serving.state import ServerState

__all__ = ["GrpcEdge"]

_SERVICE = "/inference.GRPCInferenceService/"
_OPEN = frozenset({_SERVICE + "ServerLive", _SERVICE + "ServerReady"})
_NOT_READY = {
    _SERVICE + "ServerReady": pb.ServerReadyResponse(ready=False),
    _SERVICE + "ModelReady": pb.ModelReadyResponse(ready=False),
}
#: Messages larger than this are parsed on the preprocessing pool, not on the event loop.
_PARSE_ON_LOOP_BYTES = 1024 * 1024
_DENIED_CODE = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}


class GrpcEdge(grpc.aio.ServerInterceptor):
    """The interceptor over a :class:`ServerState`; ``keys`` None: no API keys.

    Each unary method is served as a stream-unary one that reads its message itself: the
    key (in the metadata) is checked before a byte of the message is read, so a keyless
    client costs no more than its stream's flow-control window; and a message that does not
    parse is INVALID_ARGUMENT, as any other malformed request."""

    def __init__(self, state: ServerState, keys: ApiKeys | None = None) -> None:
        self.state = state
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # not a method of ours (every one of ours is unary)
        method: str = handler_call_details.method
        rid = auth = parent = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                auth = value
            elif key == logs.REQUEST_ID:
                rid = value
            elif key == "traceparent":
                parent = value
        denied = None
        if self.keys is not None and method not in _OPEN:
            denied = self.keys.check(auth)
        inner = handler.unary_unary
        parse = handler.request_deserializer
        state = self.state

        async def behavior(requests, context: grpc.aio.ServicerContext):
            rec, token = logs.start_request(rid)
            rec.traceparent = parent
            model = None
            try:
                await context.send_initial_metadata(((logs.REQUEST_ID, rec.id),))
                if denied is not None:  # before the message is read: it never is
                    kind, message = DENIED[denied]
                    code = _DENIED_CODE[denied]
                    state.metrics.edge_refusals.labels(str(denied), kind).inc()
                    logs.log_failure(rec, door="grpc", status=code.name, model=model,
                                     kind=kind, message=message)  # fmt: skip
                    await context.abort(code, message)
                logged = False
                try:
                    request = await _read(requests, parse, state, context)
                    model = getattr(request, "model_name", None) or getattr(request, "name", None)
                    if state.phase_not_ready() is not None and method in _NOT_READY:
                        return _NOT_READY[method]  # readiness is the state's to say
                    if state.loading and method not in _OPEN:
                        message = "the server is loading its models; retry shortly"
                        state.metrics.edge_refusals.labels("503", "loading").inc()
                        logged = True
                        logs.log_failure(rec, door="grpc", status="UNAVAILABLE", model=model,
                                         kind="loading", message=message)  # fmt: skip
                        await context.abort(grpc.StatusCode.UNAVAILABLE, message)
                    return await inner(request, context)
                finally:
                    code = context.code()
                    if not logged and code is not None and code != grpc.StatusCode.OK:
                        logs.log_failure(rec, door="grpc", status=code.name, model=model,
                                         kind=code.name.lower(), message=context.details())  # fmt: skip
            finally:
                logs.end_request(token)

        return grpc.stream_unary_rpc_method_handler(
            behavior,
            request_deserializer=None,  # bytes: parsed in behavior, after the key check
            response_serializer=handler.response_serializer,
        )


async def _read(requests, parse, state: ServerState, context: grpc.aio.ServicerContext):
    """The call's one message, parsed (a large one on the preprocessing pool)."""
    raw = await anext(aiter(requests), None)
    if raw is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no message")
    try:
        if parse is None:
            return raw
        if len(raw) <= _PARSE_ON_LOOP_BYTES:
            return parse(raw)
        return await state.pool.submit(Trace(), parse, raw, deadline=math.inf, stage="recv")
    except DecodeError as e:
        message = f"the message is not a valid protobuf of this method: {e}"
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

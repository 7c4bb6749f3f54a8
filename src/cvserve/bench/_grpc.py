"""The bench's gRPC transport: KServe v2 ``ModelInfer`` calls on one ``grpc.aio`` channel,
behind the load generator's connection interface (``_http.Conn``, ``_http.Transport``).

A :class:`GrpcTarget` owns one channel (one HTTP/2 connection, as one
``tritonclient.grpc`` client has) that every :class:`GrpcConnection` shares: a
"connection" is a call slot, one call at a time. Requests are serialized once per image
and resent as bytes (the channel's method has no serializers), so the client spends no
time re-encoding tensors; responses are counted, not decoded. A call's status code maps
to the HTTP-like status the results use (:data:`HTTP_STATUS`), and its ``server-timing``
trailing metadata is the Server-Timing value the HTTP doors send.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

import cvserve.bench._http as _http

__all__ = ["HTTP_STATUS", "GrpcConnection", "GrpcTarget", "parse_target", "status_of"]

SERVICE = "/inference.GRPCInferenceService"
INFER_METHOD = f"{SERVICE}/ModelInfer"
TIMING_KEY = "server-timing"
RETRY_KEY = "retry-after"

#: gRPC status code -> the HTTP-like status recorded for the call (anything else: 500).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# UNAVAILABLE is also how gRPC reports a transport failure (no server answered): those
# count as connect/protocol errors, as they do over HTTP, not as the server's 503.
_CONNECT_DETAILS = ("failed to connect", "connection refused", "dns resolution failed")
_BROKEN_DETAILS = ("socket closed", "connection reset", "broken pipe", "goaway", "end of tcp")

# Large tensors in both directions; the server's own limit is what applies.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


def parse_target(url: str) -> str:
    """``host:port`` from ``grpc://host:port``, ``grpcs://host:port`` (TLS) or a bare
    ``host:port``."""
    target = url.removeprefix("grpcs://").removeprefix("grpc://").rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in target:
        raise ValueError(f"gRPC target {url!r} is not grpc://host:port")
    return target


class _Metadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (the API key) to every call on a channel, probes included."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001
        md = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return await continuation(details._replace(metadata=md), request)


def status_of(code: grpc.StatusCode, details: str | None, has_metadata: bool) -> tuple[int, int]:
    """``(status, error_kind)`` of a finished call: an HTTP-like status and ERR_NONE, or
    status 0 and the error kind of a transport failure (no server answered)."""
    if code == grpc.StatusCode.UNAVAILABLE and not has_metadata:
        text = (details or "").lower()
        if any(d in text for d in _CONNECT_DETAILS):
            return 0, _http.ERR_CONNECT
        if any(d in text for d in _BROKEN_DETAILS):
            return 0, _http.ERR_PROTOCOL
    return HTTP_STATUS.get(code, 500), _http.ERR_NONE


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


class GrpcTarget:
    """A gRPC server's ``ModelInfer``: the channel is opened on the running loop by
    :meth:`open` (probes use :attr:`channel` with the generated stubs) and closed by
    :meth:`close`."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        ca_file: str | None = None,
        api_key: str | None = None,
    ) -> None:
        """``tls``: a TLS channel trusting ``ca_file`` (else the system's roots);
        ``api_key``: sent as ``authorization: Bearer KEY`` metadata on every call."""
        self.target = parse_target(target)
        self.tls = tls or ca_file is not None
        self._roots = Path(ca_file).read_bytes() if ca_file else None
        self._interceptors = (
            [_Metadata((("authorization", f"Bearer {api_key}"),))] if api_key else None
        )
        self.channel: grpc.aio.Channel | None = None
        self._infer: Any = None

    async def open(self) -> GrpcTarget:
        if self.channel is None:
            if self.tls:
                creds = grpc.ssl_channel_credentials(root_certificates=self._roots)
                self.channel = grpc.aio.secure_channel(
                    self.target, creds, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            else:
                self.channel = grpc.aio.insecure_channel(
                    self.target, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            self._infer = self.channel.unary_unary(INFER_METHOD)  # bytes in, bytes out
        return self

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=None)
            self.channel = None

    async def connect(
        self, loop: asyncio.AbstractEventLoop, on_done: _http.DoneCallback, timeout: float
    ) -> GrpcConnection:
        """A call slot on the shared channel; transport failures show up on its calls."""
        await self.open()
        return GrpcConnection(self._infer, loop, on_done)

    async def call(self, request: bytes, timeout: float) -> tuple[int, int, bytes, Any]:
        """One ``ModelInfer`` (the probe): ``(status, error_kind, response, trailing)``."""
        await self.open()
        try:
            call = self._infer(request, timeout=timeout)
            raw = await call
            return 200, _http.ERR_NONE, raw, await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            md = e.trailing_metadata()
            status, kind = status_of(e.code(), e.details(), bool(md))
            return status, kind, (e.details() or "").encode(), md


class GrpcConnection:
    """One call at a time on a shared channel; ``on_done`` exactly once per ``send``
    unless ``abort`` (which cancels the call) comes first."""

    __slots__ = (
        "_call",
        "_infer",
        "_loop",
        "body_len",
        "busy",
        "on_done",
        "open",
        "slot",
        "t0",
        "tag",
    )

    def __init__(
        self, infer: Any, loop: asyncio.AbstractEventLoop, on_done: _http.DoneCallback
    ) -> None:
        self._infer = infer
        self._loop = loop
        self.on_done = on_done
        self._call: Any = None
        self.open = True
        self.busy = False
        self.t0 = 0.0
        self.tag = 0
        self.slot = 0
        self.body_len = -1

    def send(self, request: bytes, t0: float) -> None:
        self.busy = True
        self.t0 = t0
        # No deadline: the server applies its own timeout, as for HTTP; the load
        # generator's sweep aborts calls past the bench's timeout.
        call = self._call = self._infer(request)
        self._loop.create_task(self._finish(call))

    def abort(self) -> None:
        """Cancel the call in flight without reporting it (the caller accounts for it)."""
        self.busy = False
        self.open = False
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def _finish(self, call: Any) -> None:
        try:
            raw = await call
            md = await call.trailing_metadata()
            status, kind = 200, _http.ERR_NONE
            self.body_len = len(raw)
        except asyncio.CancelledError:  # aborted: the caller has accounted for it
            return
        except grpc.aio.AioRpcError as e:
            md = e.trailing_metadata()
            status, kind = status_of(e.code(), e.details(), bool(md))
            self.body_len = -1 if status == 0 else len((e.details() or "").encode())
        if self._call is not call:  # aborted while the result was on its way
            return
        self._call = None
        self.busy = False
        timing = md.get(TIMING_KEY) if md else None
        retry = _retry_after(md.get(RETRY_KEY)) if md and status == 429 else None
        if kind == _http.ERR_CONNECT:
            self.open = False  # the load generator reconnects after a back-off
        self.on_done(
            self,
            status,
            kind,
            None if timing is None else timing.encode("latin-1", "replace"),
            -1,
            retry,
        )

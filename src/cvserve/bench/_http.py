"""A small asyncio HTTP/1.1 keep-alive client, fast enough that the load generator is never
the bottleneck (httpx costs ~10x more CPU per request).

One :class:`Connection` carries one request at a time (no pipelining). It parses only what
the bench needs: the status, the body framing (Content-Length, chunked, or until close),
``Server-Timing``, ``Retry-After``, ``Connection: close`` and the ``batch_size`` field of a
JSON body (by regex, not a JSON parse). Parsing the Server-Timing value is left to the
caller, after the measurement, so the hot path stays short.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

#: Error kinds for requests that got no HTTP status; code = index + 1 (0 means none).
ERROR_KINDS: tuple[str, ...] = ("connect", "timeout", "protocol")
ERR_NONE, ERR_CONNECT, ERR_TIMEOUT, ERR_PROTOCOL = 0, 1, 2, 3

_MAX_HEAD = 64 * 1024
_BATCH_RE = re.compile(rb'"batch_size"\s*:\s*(\d+)')
_K_LENGTH = b"\r\ncontent-length:"
_K_TIMING = b"\r\nserver-timing:"
_K_RETRY = b"\r\nretry-after:"
_K_CONN = b"\r\nconnection:"
_K_TE = b"\r\ntransfer-encoding:"

# Framing of the body still to read, besides a known total length (>= 0).
_CHUNKED = -1
_UNTIL_CLOSE = -2


def client_tls(ca_file: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """The client's TLS context: the system's trust store, or ``ca_file`` alone (a
    self-signed server's certificate); ``insecure`` checks no certificate at all."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class Target:
    """Where requests go: host, port and the path prefix of the server's base URL;
    ``tls`` for ``https://``, and ``headers`` that every request carries (an API key)."""

    host: str
    port: int
    prefix: str = ""
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        api_key: str | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
    ) -> Target:
        """``http://`` or ``https://`` (``ca_file``/``insecure``: see :func:`client_tls`);
        ``api_key`` is sent as ``Authorization: Bearer KEY``."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise ValueError(
                f"unsupported URL scheme {parts.scheme!r} in {url!r}: http:// or https://"
            )
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}")
        https = parts.scheme == "https"
        if (ca_file or insecure) and not https:
            raise ValueError(f"a CA file or insecure TLS needs an https:// URL, not {url!r}")
        if api_key is not None and (not api_key or any(c in api_key for c in "\r\n")):
            raise ValueError("an API key must be one non-empty line")
        return cls(
            parts.hostname,
            parts.port or (443 if https else 80),
            parts.path.rstrip("/"),
            client_tls(ca_file, insecure) if https else None,
            (("Authorization", f"Bearer {api_key}"),) if api_key else (),
        )

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Serialize one request (built once per image, then resent as is)."""
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.authority}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines += [f"{k}: {v}" for k, v in self.headers]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        lines.append("User-Agent: cvserve-bench")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def predict_request(
        self, model: str, body: bytes, content_type: str, kind: str = "model"
    ) -> bytes:
        """``POST /v1/models/{model}:predict`` (or ``/v1/pipelines/...`` for a pipeline)."""
        return self.request(
            "POST", f"/v1/{kind}s/{quote(model, safe='')}:predict", body, content_type
        )

    async def connect(
        self, loop: asyncio.AbstractEventLoop, on_done: DoneCallback, timeout: float
    ) -> Connection:
        """A new keep-alive connection (the :class:`Transport` interface)."""
        return await connect(loop, self, on_done, timeout)


def _header(low: bytes, head: bytes, key: bytes) -> bytes | None:
    i = low.find(key)
    if i < 0:
        return None
    i += len(key)
    j = head.find(b"\r\n", i)
    return head[i : j if j >= 0 else len(head)].strip()


def _all_headers(low: bytes, head: bytes, key: bytes) -> bytes | None:
    """Every occurrence of a header, comma-joined (the list semantics of Server-Timing)."""
    values = []
    i = low.find(key)
    while i >= 0:
        i += len(key)
        j = head.find(b"\r\n", i)
        j = j if j >= 0 else len(head)
        values.append(head[i:j].strip())
        i = low.find(key, j)
    if not values:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)


def dechunk(data: bytes | bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``pos``: ``(body, end)``, or None if incomplete.

    Raises ValueError on a malformed chunk.
    """
    out = []
    n = len(data)
    while True:
        j = data.find(b"\r\n", pos)
        if j < 0:
            return None
        size = int(bytes(data[pos:j]).split(b";", 1)[0].strip(), 16)
        pos = j + 2
        if size == 0:
            while True:  # trailer fields, then an empty line
                j = data.find(b"\r\n", pos)
                if j < 0:
                    return None
                if j == pos:
                    return b"".join(out), j + 2
                pos = j + 2
        if n < pos + size + 2:
            return None
        out.append(bytes(data[pos : pos + size]))
        pos += size
        if data[pos : pos + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        pos += 2


# on_done(conn, status, error_kind, server_timing, batch_size, retry_after)
DoneCallback = Callable[[Any, int, int, "bytes | None", int, "float | None"], None]


class Conn(Protocol):
    """What the load generator needs of a connection, whatever carries it (an HTTP/1.1
    :class:`Connection`, a call slot on a gRPC channel): ``send`` one prebuilt request,
    then exactly one ``on_done`` call, unless ``abort`` comes first."""

    open: bool
    busy: bool
    t0: float
    tag: int
    slot: int
    body_len: int

    def send(self, request: Any, t0: float) -> None: ...

    def abort(self) -> None: ...


class Transport(Protocol):
    """Opens connections to one server (:class:`Target` for HTTP, ``_grpc.GrpcTarget``).
    ``connect`` raises OSError or TimeoutError when the server cannot be reached."""

    async def connect(
        self, loop: asyncio.AbstractEventLoop, on_done: DoneCallback, timeout: float
    ) -> Conn: ...


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; ``send`` one request, get one ``on_done`` call.

    ``on_done`` is called exactly once per ``send``: with the status on a full response,
    or with status 0 and an error kind when the connection broke or the response was
    malformed. A connection that is not ``open`` after ``on_done`` must be replaced.
    """

    def __init__(self, on_done: DoneCallback) -> None:
        self.on_done = on_done
        self.body_len = -1  # bytes of the last response body
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.busy = False
        self.t0 = 0.0  # when the request was (meant to be) sent; set by the caller
        self.tag = 0  # caller's bookkeeping (image index)
        self.slot = 0  # caller's bookkeeping (closed-loop client)
        self.keep_body = False  # probes keep the last body; the load path does not
        self.body = b""
        self._buf = bytearray()
        self._head_len = 0
        self._need = 0
        self._status = 0
        self._timing: bytes | None = None
        self._retry: float | None = None
        self._close = False

    # asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.busy:
            if self._head_len and self._need == _UNTIL_CLOSE:
                self._complete(bytes(self._buf[self._head_len :]))
            else:
                self._fail(ERR_PROTOCOL)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: the stream cannot be trusted any more
            self.abort()
            return
        buf = self._buf
        if buf:
            buf += data
            data = buf  # type: ignore[assignment]
        if not self._head_len:
            i = data.find(b"\r\n\r\n")
            if i < 0:
                if len(data) > _MAX_HEAD:
                    self._fail(ERR_PROTOCOL, abort=True)
                elif data is not buf:
                    buf += data
                return
            if not self._parse_head(bytes(data[:i]), i + 4):
                self._fail(ERR_PROTOCOL, abort=True)
                return
        need = self._need
        if need >= 0:
            n = len(data)
            if n < need:
                if data is not buf:
                    buf += data
                return
            if n > need:  # more than one response: the server broke the framing
                self._fail(ERR_PROTOCOL, abort=True)
                return
            self._complete(data[self._head_len :])
        elif need == _CHUNKED:
            if data is not buf:
                buf += data
            try:
                done = dechunk(buf, self._head_len)
            except ValueError:
                self._fail(ERR_PROTOCOL, abort=True)
                return
            if done is not None:
                body, end = done
                if end != len(buf):
                    self._fail(ERR_PROTOCOL, abort=True)
                    return
                self._complete(body)
        elif data is not buf:  # until close
            buf += data

    # client side ----------------------------------------------------------------------
    def send(self, request: bytes, t0: float) -> None:
        self.busy = True
        self.t0 = t0
        self.transport.write(request)  # type: ignore[union-attr]

    def abort(self) -> None:
        """Drop the connection without reporting (the caller accounts for the request)."""
        self.busy = False
        self.open = False
        if self.transport is not None:
            self.transport.abort()

    # internals ------------------------------------------------------------------------
    def _parse_head(self, head: bytes, head_len: int) -> bool:
        if head[:7] != b"HTTP/1." or len(head) < 12:
            return False
        try:
            status = int(head[9:12])
        except ValueError:
            return False
        low = head.lower()
        self._status = status
        self._head_len = head_len
        self._timing = _all_headers(low, head, _K_TIMING)
        retry = _header(low, head, _K_RETRY)
        self._retry = None
        if retry is not None:
            try:
                self._retry = max(0.0, float(retry))
            except ValueError:
                self._retry = 0.0  # an HTTP-date: honoured as "now"
        conn = _header(low, head, _K_CONN)
        if head[5:8] == b"1.0":
            self._close = conn is None or conn.lower() != b"keep-alive"
        else:
            self._close = conn is not None and conn.lower() == b"close"
        if 100 <= status < 200 or status in (204, 304):
            self._need = head_len
            return True
        te = _header(low, head, _K_TE)
        if te is not None and te.lower().endswith(b"chunked"):
            self._need = _CHUNKED
            return True
        length = _header(low, head, _K_LENGTH)
        if length is None:
            self._need = _UNTIL_CLOSE
            self._close = True
            return True
        try:
            n = int(length)
        except ValueError:
            return False
        if n < 0:
            return False
        self._need = head_len + n
        return True

    def _reset(self) -> None:
        self.busy = False
        self._head_len = 0
        if self._buf:
            self._buf = bytearray()

    def _complete(self, body: bytes | bytearray) -> None:
        status = self._status
        batch = -1
        if 200 <= status < 300:
            m = _BATCH_RE.search(body)
            if m is not None:
                batch = int(m.group(1))
        if self.keep_body:
            self.body = bytes(body)
        self.body_len = len(body)
        self._reset()
        if self._close:
            self.open = False
            self.transport.close()  # type: ignore[union-attr]
        self.on_done(self, status, ERR_NONE, self._timing, batch, self._retry)

    def _fail(self, kind: int, abort: bool = False) -> None:
        self._reset()
        if abort:
            self.abort()
        self.on_done(self, 0, kind, None, -1, None)


async def connect(
    loop: asyncio.AbstractEventLoop, target: Target, on_done: DoneCallback, timeout: float
) -> Connection:
    """Open one connection; raises OSError or TimeoutError."""
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(
            lambda: Connection(on_done), target.host, target.port, ssl=target.tls
        )
    return conn


async def fetch(target: Target, request: bytes, timeout: float) -> tuple[int, bytes]:
    """One request on a fresh connection (probes, not load): ``(status, body)``.

    Raises OSError/TimeoutError when the server cannot be reached, ConnectionError when
    the response is broken.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def done(conn, status, kind, timing, batch, retry):  # noqa: ANN001
        if not fut.done():
            fut.set_result((status, kind, timing, batch, retry))

    conn = await connect(loop, target, done, timeout)
    conn.keep_body = True
    try:
        conn.send(request, 0.0)
        async with asyncio.timeout(timeout):
            status, kind, timing, batch, retry = await fut
    finally:
        conn.abort()
    if kind != ERR_NONE:
        raise ConnectionError(f"broken HTTP response ({ERROR_KINDS[kind - 1]} error)")
    return status, conn.body

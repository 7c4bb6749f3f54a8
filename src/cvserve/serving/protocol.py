"""HTTP/1.1 connections with limits before trust: nothing a client sends before its
request reaches the app (where the key is checked) costs more than a small, bounded
amount of memory, time or file descriptors.

uvicorn's httptools protocol, extended with:

- **head size and count** (``max_header_bytes``, ``max_headers``): the request line and
  headers are counted while they arrive, before they are complete (httptools buffers a
  header value whole before it calls back, so a 200 MB ``Authorization`` would otherwise
  be read into memory); over a limit: ``431`` and the connection closed;
- **idle keep-alive** (``keep_alive_timeout_ms``): a connection with no request under way,
  a new one included, is closed after this long;
- **head read** (``header_timeout_ms``): from a request's first byte, its headers must be
  complete within this long (slowloris); else ``408`` and closed;
- **body read** (``body_timeout_ms``): an *inactivity* limit: a body that receives no byte
  for this long is closed and its memory freed (the app sees the client leave). A slow but
  steady upload of a large image is never cut: each byte restarts the clock, and a pause
  while the app is not reading (flow control) does not count;
- **request bodies being received** (``max_body_bytes_in_flight``): a server-wide count
  of the bytes of bodies not yet complete (a ``Content-Length`` body counts its declared
  size from its head on, a chunked one what has arrived). A body is let in only while it
  leaves at least as much room as it takes (or when no other body is arriving, so one
  upload of the largest body always succeeds): a declared body that does not fit is
  answered ``503`` with ``Retry-After`` at once, before a byte of it is read or the app
  (and its key check) runs; a chunked one that outgrows the room is cut with ``503``.
  Stalled or slow uploads, keyless ones included, cannot hold more memory than this;
- **memory given back**: once bodies worth :data:`TRIM_AFTER_BYTES` have been let go, the
  C allocator is asked to return its free pages to the system (glibc ``malloc_trim``, a
  second later, off the event loop): freed bodies otherwise stay in the process's heap;
- **connections** (``max_connections``): a new connection over the cap closes the
  least recently active connection with no request under way (or still sending
  its head: a slowloris one is the first to go); when every connection has a request in
  flight, the new one is answered ``503`` and closed. So idle sockets cannot take every
  descriptor, and ``/healthz`` on a new connection keeps being answered.

Each connection also notes when it last did something (``last_active``): the drain closes
only connections that have been idle a moment (see :mod:`cvserve.serving.server`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["TRIM_AFTER_BYTES", "BodyBudget", "HttpLimits", "limited_protocol", "malloc_trim",
           "resolved_max_connections"]  # fmt: skip

#: Bytes of bodies let go (received whole or given up) after which free heap pages are
#: returned to the system: a few large bodies, not every small one.
TRIM_AFTER_BYTES = 8 * 1024 * 1024
#: How long after that the trim runs (bodies are freed by the app a moment after the
#: protocol lets go of them; a burst is trimmed once).
_TRIM_DELAY_S = 1.0

#: ``max_connections: 0`` takes this share of the descriptor limit (the rest: model
#: files, the gRPC door, the metrics port, pipes, logs) ...
_FD_SHARE = 0.75
#: ... but no more than this many: a CV server behind a load balancer needs few
#: connections, and each costs memory (about 10 KB of Python objects) even when idle.
_MAX_AUTO_CONNECTIONS = 4096


def resolved_max_connections(configured: int) -> int:
    """``configured``, or for 0 the automatic cap: three quarters of the soft descriptor
    limit, at most :data:`_MAX_AUTO_CONNECTIONS`, at least 16."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_AUTO_CONNECTIONS
    return max(16, min(_MAX_AUTO_CONNECTIONS, int(soft * _FD_SHARE)))


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP connection may cost before its request reaches the app (the
    defaults, and why each: :class:`cvserve.config.ServerConfig`)."""

    max_header_bytes: int
    max_headers: int
    keep_alive_timeout_s: float
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    #: Bytes of request bodies being received at once, server-wide (0: no limit).
    max_body_bytes_in_flight: int = 0
    #: A declared body over this is the app's 413 (it does not read it): not counted.
    max_body_bytes: int = 0

    @classmethod
    def from_config(cls, config) -> HttpLimits:
        return cls(
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            keep_alive_timeout_s=config.keep_alive_timeout_ms / 1000.0,
            header_timeout_s=config.header_timeout_ms / 1000.0,
            body_timeout_s=config.body_timeout_ms / 1000.0,
            max_connections=resolved_max_connections(config.max_connections),
            max_body_bytes_in_flight=config.resolved_body_bytes_in_flight(),
            max_body_bytes=config.max_body_bytes,
        )


_TRIM: list = []


def malloc_trim():
    """glibc's ``malloc_trim`` (it returns the free pages of every arena to the system;
    ``malloc_trim(0)``), else None (not glibc: musl, macOS)."""
    if not _TRIM:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            trim = libc.malloc_trim
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            trim = None
        _TRIM.append(trim)
    return _TRIM[0]


class BodyBudget:
    """The bytes of request bodies being received, server-wide (module docstring).

    ``limit`` 0: counted, never refused."""

    def __init__(self, limit: int, trim=None) -> None:
        self.limit = limit
        self._trim = trim  # None: glibc's (tests pass their own)
        self.held = 0
        self._freed = 0
        self._trim_timer: asyncio.TimerHandle | None = None

    def fits(self, size: int, mine: int = 0) -> bool:
        """Whether a body of ``size`` bytes (of which it holds ``mine`` already) may be
        received: it leaves at least as much room as it takes, or no other body is
        arriving."""
        others = self.held - mine
        return not self.limit or others == 0 or others + 2 * size <= self.limit

    def take(self, n: int) -> None:
        self.held += n

    def give(self, n: int) -> None:
        if n <= 0:
            return
        self.held -= n
        self._freed += n
        if self._freed >= TRIM_AFTER_BYTES and self._trim_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._trim_timer = loop.call_later(_TRIM_DELAY_S, self._trim_now, loop)

    def _trim_now(self, loop: asyncio.AbstractEventLoop) -> None:
        self._trim_timer = None
        self._freed = 0
        trim = self._trim or malloc_trim()
        if trim is not None:
            loop.run_in_executor(None, trim, 0)


#: A refused client that is sending a body: how long what it still sends is read and
#: dropped before the connection closes (so it reads the answer, not a reset).
_LINGER_S = 2.0

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}  # fmt: skip


def _response(status: int, kind: str, message: str, **extra) -> bytes:
    """A whole response, written before any app runs (the doors' JSON error shape)."""
    body = json.dumps({"error": {"kind": kind, "message": message, **extra}}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
        + ("retry-after: 1\r\n" if status == 503 else "")
        + "\r\n"
    )
    return head.encode() + body


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a head over a limit."""


def limited_protocol(limits: HttpLimits) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools) under ``limits`` (module docstring)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # h11: only its own head limit (uvicorn.Config's) and keep-alive
        return _tracked_h11()

    class LimitedHTTP(HttpToolsProtocol):  # type: ignore[misc]
        last_active = 0.0
        _lingering = False
        #: This server's connections, least recently active first: at the cap, finding
        #: the one to close is O(1) (plus the busy ones at the front), not a scan of all.
        _by_activity: OrderedDict[LimitedHTTP, None] = OrderedDict()
        #: This server's request bodies being received.
        budget = BodyBudget(limits.max_body_bytes_in_flight)

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._reading_head = False
            self._head_began = False  # in the chunk being parsed
            self._head_bytes = 0  # whole chunks received while the head was incomplete
            self._head_exact = 0  # request line and headers parsed so far
            self._header_count = 0
            self._refusal: bytes | None = None
            self._linger = False  # answer the refusal, then read and drop for a moment
            self._linger_timer = None
            self._head_timer = None
            self._body_timer = None
            self._body_last = 0.0
            self._body_held = 0  # bytes of the budget this connection's body holds
            self._body_declared = False

        # -- connections ----------------------------------------------------------------
        def _touch(self) -> None:
            self.last_active = time.monotonic()
            self._by_activity[self] = None
            self._by_activity.move_to_end(self)

        def connection_made(self, transport) -> None:
            self._touch()
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections and not self._evict():
                msg = f"more than {limits.max_connections} connections; try again"
                self._reply_and_close(_response(503, "too_many_connections", message=msg))
                return
            # nothing sent yet: idle, as between two requests
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def _evict(self) -> bool:
            """Close the least recently active connection with no request under way;
            False when every other connection has one."""
            for conn in self._by_activity:
                if conn is self or conn._busy():
                    continue
                if conn.transport is None or conn.transport.is_closing():
                    continue
                log.debug("at %d connections: closing the longest idle", limits.max_connections)
                conn.transport.close()
                return True
            return False

        def _busy(self) -> bool:
            """A request's head is complete and its response is not (or one is queued)."""
            if self._reading_head:
                return False
            cycle = self.cycle
            return (cycle is not None and not cycle.response_complete) or bool(self.pipeline)

        def handle_websocket_upgrade(self) -> None:
            self._by_activity.pop(self, None)  # another protocol's from now on
            self._cancel_timers()
            super().handle_websocket_upgrade()

        def connection_lost(self, exc) -> None:
            self._by_activity.pop(self, None)
            self._cancel_timers()
            self._let_go()
            super().connection_lost(exc)

        def _cancel_timers(self) -> None:
            for timer in (self._head_timer, self._body_timer, self._linger_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._body_timer = self._linger_timer = None

        def _reply_and_linger(self, response: bytes) -> None:
            """Answer a client that is sending a body, then close only once it has seen
            the answer: closing with its body unread would reset the connection, and the
            client would read a reset, not the 503 and its Retry-After. Its writing side
            is shut (it reads the end), what it still sends is dropped unread, for at
            most :data:`_LINGER_S` (nginx's lingering close)."""
            transport = self.transport
            if transport.is_closing() or not transport.can_write_eof():  # TLS: no half-close
                self._reply_and_close(response)
                return
            self._cancel_timers()
            self._reading_head = False
            self._lingering = True
            transport.write(response)
            transport.write_eof()
            self._linger_timer = self.loop.call_later(_LINGER_S, transport.close)

        def _reply_and_close(self, response: bytes) -> None:
            self._cancel_timers()
            self._reading_head = False
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

        # -- reading --------------------------------------------------------------------
        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return  # refused: dropped unread until the close
            self._touch()
            self._body_last = self.last_active
            self._unset_keepalive_if_required()
            self._head_began = False
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError:
                if self._refusal is not None:
                    if self._linger:
                        self._reply_and_linger(self._refusal)
                    else:
                        self._reply_and_close(self._refusal)
                    return
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            if self._reading_head and not self._head_began:
                # a head still arriving: counted by the chunk, before httptools has called
                # back (it buffers a header value whole); the chunk a head began in is not
                # counted, so the bound is the limit plus one read
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes:
                    self._reply_and_close(self._too_large())
                    return
            cycle = self.cycle
            if (
                not self._reading_head
                and cycle is not None
                and cycle.more_body
                and not cycle.response_complete
                and self._body_timer is None
                and not self.transport.is_closing()
            ):
                self._body_timer = self.loop.call_later(limits.body_timeout_s, self._body_check)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._reading_head = self._head_began = True
            self._head_bytes = self._head_exact = self._header_count = 0
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_expired)

        def on_url(self, url: bytes) -> None:
            self._head_exact += len(url)
            self._check_head()
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_exact += len(name) + len(value) + 4  # ": " and CRLF
            self._header_count += 1
            self._check_head()
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._reading_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._check_head()
            self._let_go()
            self._take_declared()
            super().on_headers_complete()

        # -- the body budget ------------------------------------------------------------
        def _take_declared(self) -> None:
            """A body with a ``Content-Length`` takes its whole size now, or is refused
            before a byte of it is read (and before the app runs)."""
            declared = None
            for name, value in self.headers:
                if name == b"content-length":
                    raw = value.strip()
                    declared = int(raw) if raw.isdigit() else None
            self._body_declared = declared is not None
            if not declared:
                return
            if limits.max_body_bytes and declared > limits.max_body_bytes:
                return  # the app answers 413 without reading it
            if not self.budget.fits(declared):
                self._refusal, self._linger = self._budget_full(declared), True
                raise _Refused
            self._body_held = declared
            self.budget.take(declared)

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            done = cycle is None or cycle.response_complete  # answered: dropped unread
            if not self._body_declared and not done:  # chunked: counted as it arrives
                size = self._body_held + len(body)
                if not self.budget.fits(size, mine=self._body_held):
                    self._cut_chunked(size)
                    return
                self.budget.take(len(body))
                self._body_held = size
            super().on_body(body)

        def _cut_chunked(self, size: int) -> None:
            log.info("cutting a chunked body at %d bytes: the body budget is full", size)
            self._let_go()
            self._cancel_timers()
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                cycle.disconnected = True  # the app sees the body end; its answer is ours
                cycle.message_event.set()
                self._reply_and_linger(self._budget_full(size))
                return
            self.transport.close()

        def _budget_full(self, size: int) -> bytes:
            return _response(
                503, "body_budget_full",
                f"request bodies being received hold {self.budget.held} bytes of "
                f"{limits.max_body_bytes_in_flight}; a body of {size} bytes must wait",
                limit=limits.max_body_bytes_in_flight,
            )  # fmt: skip

        def _let_go(self) -> None:
            held, self._body_held = self._body_held, 0
            self.budget.give(held)

        def on_message_complete(self) -> None:
            self._let_go()  # received whole: no longer being received
            super().on_message_complete()
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _check_head(self) -> None:
            if self._header_count > limits.max_headers:
                self._refusal = _response(
                    431, "too_many_headers", f"more than {limits.max_headers} header fields",
                    limit=limits.max_headers,
                )  # fmt: skip
                raise _Refused
            if self._head_exact > limits.max_header_bytes:
                self._refusal = self._too_large()
                raise _Refused

        def _too_large(self) -> bytes:
            return _response(
                431, "headers_too_large",
                f"request line and headers over {limits.max_header_bytes} bytes",
                limit=limits.max_header_bytes,
            )  # fmt: skip

        # -- timeouts -------------------------------------------------------------------
        def _head_expired(self) -> None:
            self._head_timer = None
            if self._reading_head:
                msg = f"request headers not complete within {limits.header_timeout_s:g} s"
                self._reply_and_close(_response(408, "header_timeout", msg))

        def _body_check(self) -> None:
            """No byte of the body for ``body_timeout_s`` (not counting a pause the app's
            flow control made): close; the app sees the client leave."""
            self._body_timer = None
            cycle = self.cycle
            if cycle is None or not cycle.more_body or cycle.response_complete:
                return
            if self.transport.is_closing():
                return
            idle = time.monotonic() - self._body_last
            if self.flow.read_paused:  # the app is not reading: not the client's stall
                self._body_last = time.monotonic()
                idle = 0.0
            if idle >= limits.body_timeout_s:
                log.info("closing a connection whose body stalled %g s", idle)
                self._cancel_timers()
                self.transport.close()
                return
            self._body_timer = self.loop.call_later(limits.body_timeout_s - idle, self._body_check)

        def on_response_complete(self) -> None:
            self._touch()
            self._let_go()  # answered without reading the rest (401, 413): not read
            super().on_response_complete()

    return LimitedHTTP


def _tracked_h11() -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TrackedH11(H11Protocol):  # type: ignore[misc]
        """Only ``last_active`` (what the drain reads): no cap, so no eviction order."""

        last_active = 0.0

        def connection_made(self, transport) -> None:
            self.last_active = time.monotonic()
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            self.last_active = time.monotonic()
            super().data_received(data)

        def on_response_complete(self) -> None:
            self.last_active = time.monotonic()
            super().on_response_complete()

    return TrackedH11

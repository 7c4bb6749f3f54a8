"""Request ids and the one log line a failed request leaves.

Each request runs in a :class:`RequestLog` context (a context variable): its id (the
client's ``X-Request-Id`` when usable, else a new one) and the warnings raised while it was
handled. The context follows the request's work into the preprocessing pool
(:class:`ContextExecutor`), so a decoder warning, raised on a pool thread, lands in the
request that caused it (:func:`capture_warnings`) instead of on stderr.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REQUEST_ID",
    "ContextExecutor",
    "RequestLog",
    "capture_warnings",
    "current",
    "end_request",
    "log_failure",
    "log_warnings",
    "logfmt",
    "request_id",
    "start_request",
]

log = logging.getLogger("cvserve.requests")

#: Header (HTTP) and metadata key (gRPC) of the request id.
REQUEST_ID = "x-request-id"
#: Longest message or warning text kept in a log line.
MAX_TEXT = 300
_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_BARE = re.compile(r"[A-Za-z0-9._:/+@-]+")


@dataclass
class RequestLog:
    """What the log line of one request says besides its status."""

    id: str
    warnings: list[str] = field(default_factory=list)
    #: A server fault behind a 500: logged with its traceback.
    exc: BaseException | None = None
    #: The client's W3C ``traceparent`` (HTTP header, gRPC metadata), for ``cvserve.otel``.
    traceparent: str | bytes | None = None


_current: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar(
    "cvserve_request", default=None
)


def request_id(given: str | bytes | None) -> str:
    """The client's id when it is short and plain (it is echoed and logged), else a new one."""
    if isinstance(given, bytes):
        given = given.decode("latin-1")
    if given and _ID_OK.fullmatch(given):
        return given
    return secrets.token_hex(8)


def start_request(given: str | bytes | None) -> tuple[RequestLog, contextvars.Token]:
    """Enter a request's context; pass the token to :func:`end_request`."""
    rec = RequestLog(request_id(given))
    return rec, _current.set(rec)


def end_request(token: contextvars.Token) -> None:
    _current.reset(token)


def current() -> RequestLog | None:
    """The request being handled in this context (None outside one)."""
    return _current.get()


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def logfmt(**fields: Any) -> str:
    """``key=value`` pairs, values quoted when they need it; None values left out."""
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        s = _clip(v) if isinstance(v, str) else str(v)
        if not _BARE.fullmatch(s):
            s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)


class _Throttle:
    """At most ``burst`` INFO lines per key (door, model, status) in each ``window_s``: a
    flood of 429s or of bad requests must not flood the log. The next line that gets out
    says how many of its kind were left out (``suppressed=N``)."""

    def __init__(self, burst: int = 50, window_s: float = 10.0) -> None:
        self.burst = burst
        self.window_s = window_s
        self._lock = threading.Lock()
        self._keys: dict[tuple, list] = {}  # key -> [window start, lines, suppressed]

    def admit(self, key: tuple, now: float) -> int | None:
        """None: leave this line out; else how many were left out before it."""
        with self._lock:
            st = self._keys.get(key)
            if st is None or now - st[0] >= self.window_s:
                if len(self._keys) > 10_000:  # many models x statuses: start afresh
                    self._keys.clear()
                st = self._keys[key] = [now, 0, st[2] if st else 0]
            if st[1] >= self.burst:
                st[2] += 1
                return None
            st[1] += 1
            left_out, st[2] = st[2], 0
            return left_out


_throttle = _Throttle()


def log_failure(
    rec: RequestLog | None,
    *,
    door: str,
    status: int | str,
    model: str | None,
    kind: str | None,
    message: str | None,
) -> None:
    """The one line of a failed request: ``request_failed id=... door=... model=... status=...
    kind=... message=... [warnings=...]``; 5xx at WARNING (server faults at ERROR, with the
    traceback), the rest at INFO, at most ``_throttle.burst`` lines per door, model and
    status every ``_throttle.window_s`` seconds (the next one out carries ``suppressed=N``)."""
    exc = rec.exc if rec is not None else None
    fault = exc is not None or (
        isinstance(status, int) and status >= 500 or status in ("INTERNAL", "UNAVAILABLE")
    )
    left_out = None
    if not fault:  # client-side refusals: throttled per door, model and status
        if not log.isEnabledFor(logging.INFO):
            return
        left_out = _throttle.admit((door, model, status), time.monotonic())
        if left_out is None:
            return
    warned = "; ".join(rec.warnings) if rec is not None and rec.warnings else None
    line = "request_failed " + logfmt(
        id=rec.id if rec is not None else None, door=door, model=model, status=status,
        kind=kind, message=message, warnings=warned, suppressed=left_out or None,
    )  # fmt: skip
    if exc is not None:
        log.error(line, exc_info=exc)
    elif fault:
        log.warning(line)
    else:
        log.info(line)


def log_warnings(rec: RequestLog, *, door: str, model: str | None, status: int | str) -> None:
    """A request that succeeded despite warnings (say, corrupt EXIF): one line at DEBUG."""
    if rec.warnings and log.isEnabledFor(logging.DEBUG):
        log.debug(
            "request_warned "
            + logfmt(
                id=rec.id, door=door, model=model, status=status, warnings="; ".join(rec.warnings)
            )
        )


# --- warnings -----------------------------------------------------------------------------
_install_lock = threading.Lock()
_installed = False
_decoder_log = logging.getLogger("cvserve.images")


def capture_warnings() -> None:
    """Route warnings raised while a request is handled into its :class:`RequestLog`, and
    Pillow's warnings outside a request to DEBUG logging; everything else as before.

    Installed once per process. ``warnings.catch_warnings`` is no way to do this: it swaps
    process-global state and is not thread-safe, while decoding runs on many threads.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        # Pillow's warnings are per image (corrupt EXIF, truncated data): every time, so each
        # request that has one hears of it, not only the first per code location.
        warnings.filterwarnings("always", module=r"PIL(\.|$)")
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            rec = _current.get()
            if rec is not None:
                rec.warnings.append(_clip(f"{category.__name__}: {message}"))
            elif "/PIL/" in filename.replace("\\", "/"):
                _decoder_log.debug("%s: %s", category.__name__, message)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        _installed = True


class ContextExecutor(ThreadPoolExecutor):
    """A thread pool whose jobs run in the context of the code that submitted them (as
    ``asyncio.to_thread`` does), so a pool thread knows the request it works for."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)

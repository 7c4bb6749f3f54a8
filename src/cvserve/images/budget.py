"""A budget of decoded pixels in flight, shared by every request a server decodes.

The preprocessing pool runs each piece of work inside :meth:`PixelBudget.scope`; the
decoder calls :func:`claim` with what it is about to allocate, read from the image's
header before any decoding, in RGB pixels (3 bytes): the pixels it makes plus its
full-size intermediates (a progressive JPEG's coefficient buffer, 2 bytes per coefficient
of every component whatever the output scale; see ``decode.decode_cost``). A claim that does not fit raises :class:`PixelBudgetFull`
(429) at once: a decoding thread never waits for memory, so it can never hold a thread
that the requests it waits for need. Whatever a scope claimed goes back when its work
ends, failed or not. Outside a scope (tests, scripts) :func:`claim` does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cvserve.errors import RequestError

__all__ = ["PixelBudget", "PixelBudgetFull", "claim"]

_local = threading.local()


class PixelBudgetFull(RequestError):
    """Decoding this image now would pass the server's pixels-in-flight budget."""

    status = 429
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1, **detail: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **detail)
        self.retry_after_s = retry_after_s


class PixelBudget:
    """At most ``limit`` decoded pixels in flight, across threads."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a pixel budget needs a limit >= 1")
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self.refused = 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> None:
        with self._lock:
            if self.in_flight + pixels > self.limit:
                self.refused += 1
                in_flight = self.in_flight
            else:
                self.in_flight += pixels
                self.peak = max(self.peak, self.in_flight)
                return
        raise PixelBudgetFull(
            f"decoding {pixels} pixels now would pass the server's budget of "
            f"{self.limit} decoded pixels in flight ({in_flight} taken); retry later",
            pixels=pixels,
            pixels_in_flight=in_flight,
            max_pixels_in_flight=self.limit,
        )

    def give(self, pixels: int) -> None:
        with self._lock:
            self.in_flight -= pixels

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Claims made on this thread inside the block come from this budget and go back
        when the block ends."""
        outer = getattr(_local, "scope", None)
        mine = _Scope(self)
        _local.scope = mine
        try:
            yield
        finally:
            _local.scope = outer
            if mine.claimed:
                self.give(mine.claimed)


class _Scope:
    __slots__ = ("budget", "claimed")

    def __init__(self, budget: PixelBudget) -> None:
        self.budget = budget
        self.claimed = 0


def claim(pixels: int) -> None:
    """Take ``pixels`` from the budget of this thread's scope (429 if they do not fit)."""
    scope = getattr(_local, "scope", None)
    if scope is None or pixels <= 0:
        return
    scope.budget.take(pixels)
    scope.claimed += pixels

"""The serving core every front door calls: what is served (a :class:`Servable`: a model
or a pipeline, the same to an edge), admission, and the pool whose one ``submit`` call owns
the wait for a thread, cancellation and the stage timing of CPU work.

An edge (``/v1`` HTTP today) translates its wire format into ``servable.parse_params`` and
``servable.predict(data, trace, deadline, params)``, and the :class:`Prediction` or the
typed error (``serving.errors``) back.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cvserve.serving.errors import DeadlineExceeded, Overloaded
from cvserve.serving.stats import ModelStats
from cvserve.trace import Trace

__all__ = ["Admission", "Prediction", "PreprocessPool", "Servable", "remaining"]

T = TypeVar("T")
C = TypeVar("C")


def remaining(deadline: float) -> float:
    """Seconds until ``deadline`` (a perf_counter time), never negative."""
    return max(0.0, deadline - time.perf_counter())


@dataclass
class Prediction:
    """A finished request: the answer, how it was batched, and (for a model) the rows of
    the model's raw outputs this request got (its output names in ``output_names``)."""

    result: dict
    batch_size: int
    image_size: tuple[int, int]
    outputs: list[Any] | None = None


class Servable(Protocol):
    """A model or a pipeline as every front door sees it."""

    name: str
    task: str
    ready: bool
    #: Its post-processing and the encoding of its answer take real CPU (pool thread).
    heavy: bool
    #: Request and batch statistics (the v2 statistics extension reads them).
    stats: ModelStats

    @property
    def timeout_ms(self) -> float: ...

    @property
    def inflight(self) -> int: ...

    def parse_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Raw request parameters checked against what this servable declares (400)."""
        ...

    async def predict(
        self, data: bytes, trace: Trace, deadline: float, params: dict[str, Any]
    ) -> Prediction:
        """``data``: encoded image bytes (a model also takes one already-preprocessed
        input row as an ndarray: preprocessing is skipped)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Admission:
    """At most ``max_queue`` requests in flight; past it a fast 429 whose Retry-After comes
    from the recent time per request."""

    def __init__(self, what: str, max_queue: int, parallel: int = 1) -> None:
        self.what = what
        self.max_queue = max_queue
        self.parallel = max(1, parallel)
        self.inflight = 0
        self._ewma_s = 0.05  # seconds per request, for Retry-After

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.inflight * self._ewma_s / self.parallel))

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.inflight >= self.max_queue:
            raise Overloaded(
                f"{self.what} has {self.inflight} requests in flight (max_queue="
                f"{self.max_queue}); retry later",
                retry_after_s=self.retry_after_s(),
                max_queue=self.max_queue,
            )
        self.inflight += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.inflight -= 1
            self._ewma_s += 0.1 * ((time.perf_counter() - t0) - self._ewma_s)


class PreprocessPool:
    """The threads that run a request's CPU work (decode, resize, normalize, stage A of a
    pipeline, heavy task heads, array encoding), shared by everything a server serves.

    Pillow and numpy release the GIL in the pixel loops, so these threads really run in
    parallel. :meth:`submit` is the only way in.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="preprocess")
        self._sem: asyncio.Semaphore | None = None

    @property
    def semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.threads)
        return self._sem

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)

    async def submit(
        self,
        trace: Trace,
        fn: Callable[..., T],
        *args: Any,
        deadline: float,
        stage: str | None = None,
        claim: Callable[[], C] | None = None,
        release: Callable[[C], None] | None = None,
        fail_stage: str | None = None,
    ) -> T:
        """``fn(*args)`` on a pool thread, for one request.

        - The wait for a free thread is charged to ``queue``; if ``deadline`` passes first
          the request gets :class:`DeadlineExceeded`.
        - ``claim()`` runs on the event loop once a thread is ours; its value becomes
          ``fn``'s first argument (a batch slot, say). If ``fn`` raises, or the request is
          cancelled (deadline, client gone) while ``fn`` runs, ``release(claimed)`` runs
          once the thread is done with it: work in progress is never abandoned halfway.
        - The work is charged to ``stage``, or, when ``stage`` is None, to the stages the
          result reports (its ``stages``: {stage: seconds}); a failure is charged to
          ``fail_stage`` (or ``stage``).
        """
        sem = self.semaphore
        try:
            await asyncio.wait_for(sem.acquire(), remaining(deadline))
        except TimeoutError:
            trace.mark("queue")
            raise DeadlineExceeded("deadline passed while waiting for a worker thread") from None
        claimed: Any = None
        try:
            if claim is not None:
                claimed = claim()
                args = (claimed, *args)
        except BaseException:
            sem.release()
            raise

        def timed() -> tuple[T, float, float]:
            t0 = time.perf_counter()
            out = fn(*args)
            return out, t0, time.perf_counter()

        work = asyncio.get_running_loop().run_in_executor(self.executor, timed)
        work.add_done_callback(lambda _: sem.release())  # free once the thread is
        try:
            out, t0, t1 = await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda f: _settle(f, release, claim is not None, claimed))
            raise
        except BaseException:
            if release is not None and claim is not None:
                release(claimed)
            trace.mark(fail_stage or stage or "queue")
            raise
        trace.add("queue", t0 - trace.last)
        if stage is not None:
            trace.add(stage, t1 - t0)
        else:
            for name, seconds in out.stages.items():  # type: ignore[attr-defined]
                trace.add(name, seconds)
        trace.advance(t1)
        return out


def _settle(work: asyncio.Future, release, claimed_any: bool, claimed: Any) -> None:
    """A cancelled request's work finished: give back what it claimed, keep its error."""
    if not work.cancelled():
        work.exception()  # retrieved: the request that wanted it is gone
    if release is not None and claimed_any:
        release(claimed)

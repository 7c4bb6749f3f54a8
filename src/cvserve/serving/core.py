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

from cvserve.images.budget import PixelBudget
from cvserve.serving.errors import DeadlineExceeded, Overloaded
from cvserve.serving.stats import ModelStats
from cvserve.trace import Trace

__all__ = ["Admission", "Prediction", "PreprocessPool", "QueueGrowth", "Servable", "remaining"]

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


#: Default admission by time (``max_wait_s=None``): refuse a request expected to wait
#: longer than serving this many full rounds of batches (``round_rows``) at the measured
#: rate takes. On an accelerator (``AUTO_WAIT_ROUNDS``, 2), a model at 3x capacity then
#: holds about one full batch running and one filling, the least that keeps its batches
#: full, which is where its throughput is. On a CPU (``CPU_WAIT_ROUNDS``, 1.25) a batch
#: costs about the sum of its images, so fuller batches buy little and mostly add waiting:
#: benchmarks/overload.py at 3x capacity (resnet18, 2 repeats each) gave accepted p99
#: 1.8-1.9x the p99 at capacity with 1.25 rounds against 3.0x with 2 (one core), at the
#: same goodput. It applies only while the queue grows (:class:`QueueGrowth`): applied
#: to every queue, it refused closed loops (c=16, resnet50: 9,944 429s, half the
#: throughput of the limit turned off), which stand at their number of clients.
AUTO_WAIT_ROUNDS = 2.0
CPU_WAIT_ROUNDS = 1.25
#: The automatic wait limit applies only while the queue grows (:class:`QueueGrowth`): a
#: completion takes back ``1 + GROWTH_SLACK`` arrivals, so arrivals must outrun
#: completions by more than this share to keep the queue counted as growing.
GROWTH_SLACK = 0.25
#: Refusals by the wait limit are counted over this many seconds to size Retry-After.
REFUSAL_TAU_S = 1.0
MAX_RETRY_AFTER_S = 30


class ServiceRate:
    """Requests a servable finishes per second while it is busy (anything in flight).

    Fed with completion events (``completed(now, rows)``: a batch of ``rows``, or one
    request); the gap since the previous completion counts only when the servable was
    busy at every event in it (``note``), so idle time never lowers the rate. An
    exponentially weighted average over ``tau_s`` seconds of busy time. Under overload
    it is the throughput; at light load it is lower than what the servable could do
    (batches are smaller), which errs on the side of refusing.
    """

    def __init__(self, tau_s: float = 2.0, min_s: float = 0.2) -> None:
        self.tau_s = tau_s
        self.min_s = min_s
        self.samples = 0
        self._rows = 0.0  # decayed completions
        self._busy = 0.0  # decayed busy seconds
        self._last: float | None = None
        self._clean = False  # busy at every event since _last

    def note(self, busy: bool) -> None:
        self._clean = self._clean and busy

    def completed(self, now: float, rows: float, busy_after: bool) -> None:
        if self._last is not None and self._clean:
            dt = max(0.0, now - self._last)
            decay = math.exp(-dt / self.tau_s)
            self._rows = self._rows * decay + rows
            self._busy = self._busy * decay + dt
            self.samples += 1
        self._last = now
        self._clean = busy_after

    @property
    def per_s(self) -> float | None:
        """The rate, or None until ``min_s`` seconds of busy time were seen."""
        if self._busy < self.min_s or self._rows <= 0:
            return None
        return self._rows / self._busy


class QueueGrowth:
    """Tells a queue that grows (arrivals outrun service: overload) from one that stands
    (a closed loop of many clients: each sends again once answered, so arrivals equal
    completions and the queue holds at the number of clients).

    ``excess`` counts every offered arrival (refused ones too) up and takes back
    ``1 + GROWTH_SLACK`` for every request that leaves; it never goes below 0 and is
    capped at ``burst``. Without refusals it is at most the queue itself, so a standing
    queue (at most ``max_queue`` requests, which the count limit holds anyway) never
    reaches ``burst`` = ``max_queue`` + one round. Only arrivals that keep coming while
    the queue is full (refused by the count or by their deadline) push it there: then the
    queue is ``growing`` until ``excess`` is back at half of ``burst`` (arrivals have not
    outrun completions by ``GROWTH_SLACK`` for that long), or an arrival finds the
    servable idle for a while (``arrived(idle=True)``: :class:`Admission` says so after
    a round of batches' time with nothing in flight; under overload the queue empties
    for moments at most). Counts, not rates: a burst of clients arriving at once is a
    count, overload is a rate that keeps adding to it.
    """

    def __init__(self, burst: float) -> None:
        self.burst = burst
        self.excess = 0.0
        self.growing = False

    def arrived(self, idle: bool) -> None:
        if idle:  # nothing in flight: whatever grew before has drained
            self.excess, self.growing = 0.0, False
        self.excess = min(self.burst, self.excess + 1.0)
        if self.excess >= self.burst:
            self.growing = True

    def left(self) -> None:
        self.excess = max(0.0, self.excess - 1.0 - GROWTH_SLACK)
        if self.growing and self.excess <= self.burst / 2:
            self.growing = False


class Admission:
    """Who gets in. Always at most ``max_queue`` requests in flight; and once the service
    rate is known (:class:`ServiceRate`), no request whose expected wait exceeds
    ``max_wait_s`` or its own deadline. Both refusals are a fast 429 with a Retry-After.

    Expected wait = requests in flight ahead (preprocessing, waiting or running) / service
    rate + one batch (the mean batch time when the servable reports its batches through
    :meth:`observe_batch`, which also measure the rate; else one request's share,
    1 / rate, and the rate comes from requests leaving). ``max_wait_s``: None, automatic
    (the time ``rounds`` rounds of ``round_rows`` requests take at the measured rate:
    ``AUTO_WAIT_ROUNDS`` on an accelerator, ``CPU_WAIT_ROUNDS`` on a CPU), applied only
    while the queue grows (:class:`QueueGrowth`), so that many clients each waiting their
    turn are queued, not refused; a number, always applied; 0, off (count limit only).
    ``clock``: perf_counter, or a test's own.
    """

    def __init__(
        self,
        what: str,
        max_queue: int,
        parallel: int = 1,
        *,
        max_wait_s: float | None = 0.0,
        round_rows: int | None = None,
        rounds: float = AUTO_WAIT_ROUNDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.what = what
        self.max_queue = max_queue
        self.parallel = max(1, parallel)
        self.max_wait_s = max_wait_s
        self.round_rows = round_rows or self.parallel
        self.rounds = rounds
        self.rate = ServiceRate()
        self.growth = QueueGrowth(max_queue + self.round_rows)
        self.clock = clock
        self.inflight = 0
        self._idle_since: float | None = None  # clock time the last request left
        self._refusals = 0.0  # refusals by the wait limit, decayed over REFUSAL_TAU_S
        self._refused_at = 0.0
        self._ewma_s = 0.05  # seconds per request, for Retry-After before any rate
        self._batch_s: float | None = None  # mean batch time, when batches are reported

    # -- what the estimate says --------------------------------------------------------
    def wait_limit_s(self) -> float | None:
        """The longest expected wait admitted while the queue grows (the automatic limit
        applies only then; None: no limit by time yet, or off)."""
        if self.max_wait_s is not None:
            return self.max_wait_s or None
        rate = self.rate.per_s
        return None if rate is None else self.rounds * self.round_rows / rate

    def wait_limit_applies(self) -> bool:
        """Whether the wait limit refuses now: a fixed one always, the automatic one while
        the queue grows."""
        return self.max_wait_s is not None or self.growth.growing

    def expected_wait_s(self) -> float | None:
        """A new request's expected time to its answer; None until the rate is known."""
        rate = self.rate.per_s
        if rate is None:
            return None
        own = self._batch_s if self._batch_s is not None else 1.0 / rate
        return self.inflight / rate + own

    def retry_after_s(self) -> int:
        rate = self.rate.per_s
        if rate is not None:
            return max(1, math.ceil(self.inflight / rate))
        return max(1, math.ceil(self.inflight * self._ewma_s / self.parallel))

    # -- events ------------------------------------------------------------------------
    def observe_batch(self, rows: int, seconds: float, end: float) -> None:
        """A batch of ``rows`` finished at ``end`` (``clock`` time) after ``seconds``."""
        b = self._batch_s
        self._batch_s = seconds if b is None else b + 0.2 * (seconds - b)
        # its requests leave admission right after; the last one out ends the busy time
        self.rate.completed(end, rows, busy_after=True)

    @contextmanager
    def admit(self, deadline: float | None = None) -> Iterator[None]:
        """Admit one request (``deadline``: its ``clock`` deadline) or raise 429."""
        self.growth.burst = self.max_queue + self.round_rows
        self.growth.arrived(idle=self._idle_for_a_round())  # counted even if refused
        if self.inflight >= self.max_queue:
            raise Overloaded(
                f"{self.what} has {self.inflight} requests in flight (max_queue="
                f"{self.max_queue}); retry later",
                retry_after_s=self.retry_after_s(),
                max_queue=self.max_queue,
            )
        if self.inflight:
            self._refuse_by_time(deadline)
        self.rate.note(self.inflight > 0)  # arriving at an idle servable ends a gap
        self.inflight += 1
        t0 = self.clock()
        try:
            yield
        finally:
            t1 = self.clock()
            self.inflight -= 1
            self.growth.left()
            if not self.inflight:
                self._idle_since = t1
            if self._batch_s is None:  # no batches reported: requests are the events
                self.rate.completed(t1, 1, busy_after=self.inflight > 0)
            else:
                self.rate.note(self.inflight > 0)
            self._ewma_s += 0.1 * ((t1 - t0) - self._ewma_s)

    def _idle_for_a_round(self) -> bool:
        """Nothing in flight for longer than a round of batches takes (or since start)."""
        if self.inflight:
            return False
        rate = self.rate.per_s
        if self._idle_since is None or rate is None:
            return True
        return self.clock() - self._idle_since > self.round_rows / rate

    def _refuse_by_time(self, deadline: float | None) -> None:
        wait = self.expected_wait_s()
        if wait is None:
            return
        limit = self.wait_limit_s() if self.wait_limit_applies() else None
        left = None if deadline is None else max(0.0, deadline - self.clock())
        if limit is not None and wait > limit and (left is None or limit <= left):
            why, bound = f"max_queue_wait_ms={limit * 1000:.0f}", limit
        elif left is not None and wait > left:
            why, bound = f"its deadline in {left * 1000:.0f} ms", left
        else:
            return
        rate = self.rate.per_s or 0.0
        retry = max(1, math.ceil(wait - bound))
        if self.max_wait_s is None and bound == limit:  # the automatic limit refused
            retry = max(retry, self._spread_retries(rate))
        raise Overloaded(
            f"{self.what}: expected wait {wait * 1000:.0f} ms ({self.inflight} requests ahead "
            f"at {rate:.1f}/s) exceeds {why}; retry later",
            retry_after_s=retry,
            expected_wait_ms=round(wait * 1000.0, 1),
            limit_ms=round(bound * 1000.0, 1),
            queue=self.inflight,
            service_rate_per_s=round(rate, 2),
        )

    def _spread_retries(self, rate: float) -> int:
        """Retry-After while the queue grows: long enough that the refused clients that
        honour it come back slower than ``GROWTH_SLACK`` x the service rate, which lets
        a closed loop refused during an overload be told from the overload once that
        ends (at 3x capacity, ~2 x rate refusals a second: ~8 s)."""
        now = self.clock()
        self._refusals = self._refusals * math.exp(-(now - self._refused_at) / REFUSAL_TAU_S)
        self._refusals += 1.0
        self._refused_at = now
        per_s = self._refusals / REFUSAL_TAU_S
        return min(MAX_RETRY_AFTER_S, math.ceil(per_s / (GROWTH_SLACK * max(rate, 1e-3))))

    def describe(self) -> dict[str, Any]:
        """The admission settings and what the estimate says now (model descriptions)."""
        rate = self.rate.per_s
        limit = self.wait_limit_s()
        wait = self.expected_wait_s()
        return {
            "max_queue": self.max_queue,
            "max_queue_wait_ms": "auto" if self.max_wait_s is None else self.max_wait_s * 1000,
            "auto_rounds": self.rounds if self.max_wait_s is None else None,
            "wait_limit_ms": None if limit is None else round(limit * 1000.0, 1),
            "service_rate_per_s": None if rate is None else round(rate, 2),
            "expected_wait_ms": None if wait is None else round(wait * 1000.0, 1),
            "inflight": self.inflight,
            # the automatic limit refuses only while arrivals outrun service
            "queue_growing": self.growth.growing,
            "wait_limit_applies": self.wait_limit_applies() and limit is not None,
        }


class PreprocessPool:
    """The threads that run a request's CPU work (decode, resize, normalize, stage A of a
    pipeline, heavy task heads, array encoding), shared by everything a server serves.

    Pillow and numpy release the GIL in the pixel loops, so these threads really run in
    parallel. :meth:`submit` is the only way in. With ``pixel_budget``, the pixels each
    piece of work decodes are claimed from it (:mod:`cvserve.images.budget`).
    """

    def __init__(self, threads: int | None = None, pixel_budget: PixelBudget | None = None):
        self.threads = threads or os.cpu_count() or 1
        self.pixel_budget = pixel_budget
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

        budget = self.pixel_budget

        def timed() -> tuple[T, float, float]:
            t0 = time.perf_counter()
            if budget is None:
                out = fn(*args)
            else:
                with budget.scope():
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

"""The load generator's loop for one point (planned in :mod:`cvserve.bench.point`): closed
loop (N clients back to back) or open loop (Poisson arrivals), measured in windows.

Everything runs as callbacks on one event loop: a response's arrival sends the next
request from inside ``data_received`` (closed loop), and a timer releases the arrivals
that are due (open loop). No task or future is created per request, which is what lets
one core drive thousands of requests per second. The transport is pluggable
(``_http.Transport``): an HTTP/1.1 keep-alive connection or a call slot on a gRPC channel
(grpc.aio brings its own task per call), each reporting through the same ``on_done``.

Time is ``time.perf_counter()``. A request's latency runs from its *intended* send time:
in the open loop that is its scheduled arrival, so a server (or a client) that falls
behind shows up as latency instead of silently lowering the offered rate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from time import perf_counter
from typing import Any

import numpy as np

import cvserve.bench._http as _http
from cvserve.bench.point import Arrivals, OnProgress, PointPlan, PointRecords, Window
from cvserve.bench.stats import is_stable

log = logging.getLogger(__name__)

__all__ = ["run_point"]

_TICK = 0.05  # seconds between housekeeping passes (timeouts, windows, stop checks)
_PROGRESS_EVERY = 0.25
_CONNECT_BACKOFF = 0.05  # after a refused connection, before the client tries again


class _Point:
    """State of one running point; see the module docstring for the design."""

    def __init__(
        self,
        plan: PointPlan,
        target: _http.Transport,
        requests: Sequence[Any],
        progress: OnProgress | None,
    ) -> None:
        self.plan = plan
        self.target = target
        self.reqs = list(requests)
        self.images = itertools.cycle(range(len(self.reqs)))
        self.progress = progress
        self.loop = asyncio.get_running_loop()
        self.records: list[tuple] = []
        self.running = False
        self.stop_len = 0  # requests mode: stop once this many records exist
        self.stop_reason = ""
        self.tasks: set[asyncio.Task] = set()
        self.conns: list[_http.Conn | None] = []  # closed loop: one per client
        self.pool: set[_http.Conn] = set()  # open loop: every open connection
        self.idle: list[_http.Conn] = []
        self.in_flight = 0
        self.drops: list[float] = []
        self.arrival_log: list[np.ndarray] = []
        self.timer: asyncio.TimerHandle | None = None
        self.windows: list[Window] = []
        self.unfinished = 0
        self.lag_sum = self.lag_max = 0.0  # open loop: how late arrivals were released
        self.lag_n = 0
        self.measure_lo = -1  # index of the first record after the warmup
        self.retry_waits: list[tuple[float, float]] = []  # (429 answered at, Retry-After s)
        self._errors = self._err_seen = 0

    # --- closed loop ----------------------------------------------------------------------
    def _done_closed(self, conn, status, kind, timing, batch, retry) -> None:  # noqa: ANN001
        t1 = perf_counter()
        records = self.records
        records.append((conn.t0, t1, status, kind, timing, batch, conn.tag, conn.body_len))
        if self.stop_len and len(records) >= self.stop_len:
            self.running = False
        if not self.running:
            return
        if retry is not None and status == 429 and self.plan.honor_retry_after and retry > 0:
            self.retry_waits.append((t1, retry))
            self.loop.call_later(retry, self._next_closed, conn)
        elif conn.open:
            i = next(self.images)
            conn.tag = i
            conn.send(self.reqs[i], t1)
        else:
            self._connect_closed(conn.slot, 0.0 if kind != _http.ERR_CONNECT else _CONNECT_BACKOFF)

    def _next_closed(self, conn: _http.Conn) -> None:
        if not self.running:
            return
        if conn.open and not conn.busy:
            i = next(self.images)
            conn.tag = i
            conn.send(self.reqs[i], perf_counter())
        else:
            self._connect_closed(conn.slot, 0.0)

    def _connect_closed(self, slot: int, delay: float) -> None:
        self._spawn(self._open_closed(slot, delay))

    async def _open_closed(self, slot: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if not self.running:
            return
        try:
            conn = await self.target.connect(self.loop, self._done_closed, self.plan.timeout)
        except OSError:
            if self.running:
                now = perf_counter()
                self.records.append((now, now, 0, _http.ERR_CONNECT, None, -1, -1, -1))
                self._connect_closed(slot, _CONNECT_BACKOFF)
            return
        if not self.running:
            conn.abort()
            return
        conn.slot = slot
        self.conns[slot] = conn
        i = next(self.images)
        conn.tag = i
        conn.send(self.reqs[i], perf_counter())

    # --- open loop --------------------------------------------------------------------
    def _done_open(self, conn, status, kind, timing, batch, retry) -> None:  # noqa: ANN001
        self.records.append(
            (conn.t0, perf_counter(), status, kind, timing, batch, conn.tag, conn.body_len)
        )
        self.in_flight -= 1
        if self.stop_len and len(self.records) >= self.stop_len:
            self.running = False
        if conn.open:
            self.idle.append(conn)
        else:
            self.pool.discard(conn)

    def _fire(self) -> None:
        """Release every arrival that is due, then sleep until the next one."""
        if not self.running:
            return
        now = perf_counter()
        times, pos = self._times, self._pos
        cap = self.plan.max_in_flight
        while True:
            if pos == len(times):
                self._times = times = self._next_arrivals()
                pos = 0
            t = times[pos]
            if t > now:
                break
            pos += 1
            lag = now - t
            self.lag_sum += lag
            self.lag_n += 1
            if lag > self.lag_max:
                self.lag_max = lag
            if self.in_flight >= cap:
                self.drops.append(t)
                continue
            self.in_flight += 1
            i = next(self.images)
            idle = self.idle
            while idle:
                conn = idle.pop()
                if conn.open and not conn.busy:
                    conn.tag = i
                    conn.send(self.reqs[i], t)
                    break
            else:
                self._spawn(self._open_send(t, i))
        self._pos = pos
        self.timer = self.loop.call_later(max(0.0, times[pos] - perf_counter()), self._fire)

    def _next_arrivals(self) -> list[float]:
        times = self._t_start + self._arrivals.chunk()
        self.arrival_log.append(times)
        return times.tolist()  # floats index faster than a numpy array, one at a time

    async def _open_send(self, t0: float, i: int) -> None:
        try:
            conn = await self.target.connect(self.loop, self._done_open, self.plan.timeout)
        except OSError:
            if self.running:
                self.records.append((t0, perf_counter(), 0, _http.ERR_CONNECT, None, -1, i, -1))
                self.in_flight -= 1
            return
        if not self.running:
            conn.abort()
            return
        self.pool.add(conn)
        conn.tag = i
        conn.send(self.reqs[i], t0)

    # --- housekeeping -----------------------------------------------------------------
    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _sweep_timeouts(self, now: float) -> None:
        limit = now - self.plan.timeout
        conns = self.conns if self.plan.mode == "closed" else list(self.pool)
        for conn in conns:
            if conn is not None and conn.busy and conn.t0 < limit:
                conn.abort()
                self.records.append((conn.t0, now, 0, _http.ERR_TIMEOUT, None, -1, conn.tag, -1))
                if self.plan.mode == "closed":
                    self._connect_closed(conn.slot, 0.0)
                else:
                    self.in_flight -= 1
                    self.pool.discard(conn)

    def _split(self, boundary: float, lo: int) -> int:
        """Index of the first record (at or after ``lo``) that completed at/after ``boundary``."""
        records = self.records
        i = len(records)
        while i > lo and records[i - 1][1] >= boundary:
            i -= 1
        return i

    def _window(self, lo: int, hi: int, start: float, end: float) -> Window:
        recs = self.records[lo:hi]
        ok = [r[1] - r[0] for r in recs if 200 <= r[2] < 300]
        seconds = end - start
        return Window(
            start=start - self.t_start,
            seconds=seconds,
            completed=len(recs),
            ok=len(ok),
            throughput_rps=len(ok) / seconds if seconds > 0 else 0.0,
            p50_ms=float(np.median(ok)) * 1000.0 if ok else None,
        )

    def _count_errors(self) -> int:
        """Errors since the warm-up ended (the warm-up's are not the table's)."""
        if self.measure_lo < 0:
            return 0
        records = self.records
        start = max(self._err_seen, self.measure_lo)
        self._errors += sum(1 for r in records[start:] if not 200 <= r[2] < 300)
        self._err_seen = len(records)
        return self._errors

    def _emit(self, kind: str, now: float, **extra: Any) -> None:
        if self.progress is None:
            return
        plan = self.plan
        measured = len(self.records) - self.measure_lo if self.measure_lo >= 0 else 0
        event = {
            "event": kind,
            "point": plan.index,
            "mode": plan.mode,
            "concurrency": plan.concurrency,
            "rate": plan.rate,
            "elapsed": now - self.t_start,
            "expected_seconds": plan.expected_seconds,
            "warming_up": self.measure_lo < 0,
            "completed": len(self.records),
            "measured": measured,
            "requests_target": plan.requests,
            "errors": self._count_errors(),
            "in_flight": self.in_flight if plan.mode == "open" else plan.concurrency,
            "windows": len(self.windows),
        }
        event.update(extra)
        try:
            self.progress(event)
        except Exception:  # a broken display must not break the measurement
            log.exception("progress callback failed")

    # --- the point ---------------------------------------------------------------------
    async def run(self) -> PointRecords:
        plan = self.plan
        rule = plan.stop_rule
        self.t_start = t_start = perf_counter()
        warm_end = t_start + plan.warmup
        hard_end = warm_end + (plan.duration if rule == "duration" else plan.max_duration)
        self.running = True
        if plan.mode == "closed":
            self.conns = [None] * plan.concurrency  # type: ignore[operator]
            for slot in range(plan.concurrency):  # type: ignore[arg-type]
                self._connect_closed(slot, 0.0)
        else:
            self._arrivals = Arrivals(plan.rate, [plan.seed, plan.index])  # type: ignore[arg-type]
            self._t_start = t_start
            self._times = self._next_arrivals()
            self._pos = 0
            self._fire()

        win_start, boundary = t_start, warm_end  # the first "window" is the warmup
        lo = 0  # first record of the current window
        next_progress = t_start
        stable: bool | None = None
        measure_end = hard_end
        self._emit("start", t_start)
        try:
            while True:
                await asyncio.sleep(_TICK)
                now = perf_counter()
                self._sweep_timeouts(now)
                while now >= boundary:
                    hi = self._split(boundary, lo)
                    if self.measure_lo < 0:
                        self.measure_lo = hi
                        if rule == "requests":
                            self.stop_len = hi + plan.requests  # type: ignore[operator]
                            if len(self.records) >= self.stop_len:
                                self.running = False
                    else:
                        w = self._window(lo, hi, win_start, boundary)
                        self.windows.append(w)
                        self._emit("window", now, window=w)
                        if rule == "stability" and is_stable(
                            [x.throughput_rps for x in self.windows],
                            [x.p50_ms for x in self.windows],
                            plan.tolerance,
                        ):
                            stable = True
                            self.stop_reason = "stable"
                            measure_end = boundary
                            self.running = False
                            break
                    lo, win_start = hi, boundary
                    boundary += plan.window
                    if rule == "duration":  # the last window ends with the duration
                        boundary = min(boundary, hard_end)
                        if boundary <= win_start:
                            boundary = float("inf")
                if not self.running:
                    if not self.stop_reason:
                        self.stop_reason = "requests"
                        # just past the last counted completion: the interval is half-open
                        measure_end = float(
                            np.nextafter(self.records[self.stop_len - 1][1], np.inf)
                        )
                        if measure_end > win_start:
                            hi = self._split(measure_end, lo)
                            self.windows.append(self._window(lo, hi, win_start, measure_end))
                    break
                if now >= hard_end:
                    self.stop_reason = "duration" if rule == "duration" else "max_duration"
                    if rule == "stability":
                        stable = False
                    break
                if now >= next_progress:
                    next_progress = now + _PROGRESS_EVERY
                    self._emit("tick", now)
        finally:
            self._stop()
        result = self._result(warm_end, measure_end, stable)
        # the end's count is the table's: errors in the measured interval only (with the
        # stability rule, the last three windows)
        measured_errors = int(
            (result.measured & ((result.status < 200) | (result.status >= 300))).sum()
        )
        self._emit("end", perf_counter(), stop_reason=self.stop_reason, stable=stable,
                   errors=measured_errors)  # fmt: skip
        return result

    def _stop(self) -> None:
        self.running = False
        if self.timer is not None:
            self.timer.cancel()
        for task in list(self.tasks):
            task.cancel()
        if self.plan.mode == "open":
            self.unfinished = self.in_flight  # busy connections and those still connecting
        for conn in [*self.conns, *self.pool]:
            if conn is not None:
                if conn.busy and self.plan.mode == "closed":
                    self.unfinished += 1
                conn.abort()
        self.pool.clear()
        self.idle.clear()

    def _result(self, warm_end: float, measure_end: float, stable: bool | None) -> PointRecords:
        plan = self.plan
        measure_start = warm_end
        if plan.stop_rule == "stability" and self.windows:
            # the last three windows are the measurement (those that agreed, if they did)
            measure_start = self.t_start + self.windows[-3:][0].start
            measure_end = self.t_start + self.windows[-1].start + self.windows[-1].seconds
        warnings = []
        if self.stop_reason == "max_duration" and plan.stop_rule == "requests":
            warnings.append(
                f"stopped by max_duration={plan.max_duration}s before {plan.requests} requests"
            )
        if self.stop_reason == "max_duration" and plan.stop_rule == "stability":
            warnings.append(
                f"not stable within {plan.tolerance:.0%} after max_duration={plan.max_duration}s"
            )
        drops = np.asarray(self.drops, dtype=np.float64)
        offered = 0
        if plan.mode == "open":
            times = np.concatenate(self.arrival_log)
            offered = int(((times >= measure_start) & (times < measure_end)).sum())
        cols = list(zip(*self.records, strict=True)) if self.records else [()] * 8
        return PointRecords(
            plan=plan,
            t_start=self.t_start,
            t0=np.asarray(cols[0], dtype=np.float64),
            t1=np.asarray(cols[1], dtype=np.float64),
            status=np.asarray(cols[2], dtype=np.int32),
            error=np.asarray(cols[3], dtype=np.int8),
            timing=list(cols[4]),
            batch=np.asarray(cols[5], dtype=np.int32),
            image=np.asarray(cols[6], dtype=np.int32),
            nbytes=np.asarray(cols[7], dtype=np.int64),
            windows=self.windows,
            measure_start=measure_start,
            measure_end=measure_end,
            stop_reason=self.stop_reason,
            stable=stable,
            dropped=int(((drops >= measure_start) & (drops < measure_end)).sum()),
            dropped_total=len(self.drops),
            offered=offered,
            unfinished=self.unfinished,
            send_lag=(self.lag_sum / max(1, self.lag_n), self.lag_max)
            if plan.mode == "open"
            else None,
            warnings=warnings,
            retry_wait_s=sum(r for t, r in self.retry_waits if measure_start <= t < measure_end),
        )


async def run_point(
    plan: PointPlan,
    target: _http.Transport,
    requests: Sequence[Any],
    progress: OnProgress | None = None,
) -> PointRecords:
    """Load ``target`` as ``plan`` says, cycling through the prebuilt ``requests`` (what
    the target's connections send: HTTP request bytes, serialized gRPC messages)."""
    if (plan.concurrency is None) == (plan.rate is None):
        raise ValueError("a point has either a concurrency or a rate")
    if not requests:
        raise ValueError("no requests to send")
    point = _Point(plan, target, requests, progress)
    return await point.run()

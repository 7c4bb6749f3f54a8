"""Dynamic batcher: requests write their input straight into a slot of a preallocated batch
buffer; full or timed-out batches run on N instance workers, each with its own runtime.

Contract (all methods are called on the event loop thread; workers report back through
``call_soon_threadsafe``):

* ``reserve()`` hands out the next slot of the *open* batch. A batch takes at most
  ``max_batch_size`` slots; the one that fills it closes it.
* ``commit(slot)`` says the slot holds a valid input and returns a future for that row's
  outputs; ``release(slot)`` says it never will (bad image) and leaves a hole that is
  squeezed out before the batch runs, so a bad request never costs a batch-mate anything.
* A request that is on its way to a slot (waiting for a thread, or being preprocessed)
  says so with ``with batcher.incoming(): ...`` around its reserve/commit.
* The delay clock starts at the first commit of a batch. A batch is dispatched when an
  instance is idle and the batch is full, or its first commit is ``max_delay_ms`` old
  (then it stops taking slots), or no other request is on its way (waiting could not
  make the batch bigger, only later). While every instance is busy the
  open batch keeps growing, so batches get bigger exactly when the server is loaded.
* A closed batch waits for slots still being written; batches run in the order they closed.
* Cancelling a row's future (deadline, disconnect) drops only that row's result.
* A failed runtime call fails only the row(s) that cause it (:class:`_Isolation`): the
  batch is bisected by reruns, the rest get their answers, and only runtime calls that
  succeeded are reported to ``on_batch`` (a failure's time is no batch time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from cvserve.config import BatchConfig
from cvserve.errors import RequestError
from cvserve.runtime.device_rows import read_mark
from cvserve.runtime.onnx import Runtime
from cvserve.serving.errors import BadRequest, InferenceFailed

log = logging.getLogger(__name__)

_PENDING, _READY, _HOLE = 0, 1, 2


@dataclass(frozen=True)
class BatchInfo:
    """How the batch a row rode in ran (perf_counter seconds)."""

    size: int
    instance: int
    infer_start: float
    infer_end: float
    #: How the runtime says its call split (``batch_wait`` for a device, ``h2d``, ``infer``,
    #: ``d2h``; seconds), when it says (the simulated accelerator does).
    stages: Mapping[str, float] | None = None
    #: The batch ran on the simulated accelerator: no real DNN ran.
    simulated: bool = False


class _Batch:
    __slots__ = ("buf", "states", "futures", "assigned", "pending", "first_ready", "closed")

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf
        n = buf.shape[0]
        self.states = [_PENDING] * n
        self.futures: list[asyncio.Future | None] = [None] * n
        self.assigned = 0
        self.pending = 0
        self.first_ready: float | None = None
        self.closed = False

    def ready_rows(self) -> list[int]:
        return [i for i in range(self.assigned) if self.states[i] == _READY]


@dataclass(frozen=True)
class Slot:
    """Where one request writes its model input."""

    batch: _Batch
    index: int

    @property
    def view(self) -> np.ndarray:
        return self.batch.buf[self.index]


class Batcher:
    """Forms batches from committed slots and runs them on instance worker threads."""

    def __init__(
        self,
        runtimes: Sequence[Runtime],
        item_shape: Sequence[int],
        dtype: str,
        config: BatchConfig,
        *,
        name: str = "model",
        on_batch: Callable[[BatchInfo], None] | None = None,
    ) -> None:
        if len(runtimes) != config.instances:
            raise ValueError(f"{config.instances} instances need as many runtimes")
        self.config = config
        self.name = name
        self.item_shape = tuple(item_shape)
        self.dtype = np.dtype(dtype)
        #: Called on the event loop with each finished batch's BatchInfo (metrics).
        self.on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: _Batch | None = None
        self._closed: deque[_Batch] = deque()
        self._free_buffers: list[np.ndarray] = []
        self._idle: list[int] = list(range(config.instances))
        self._timer: asyncio.TimerHandle | None = None
        self._work: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in runtimes]
        self._threads = [
            threading.Thread(
                target=self._worker, args=(i, rt), name=f"{name}-instance-{i}", daemon=True
            )
            for i, rt in enumerate(runtimes)
        ]
        self._started = False
        #: Batch buffers allocated (they are reused, never freed while serving).
        self.buffers_made = 0
        #: Requests on their way (``incoming``) that have not yet committed or released a
        #: slot. Nobody upstream, no waiting.
        self._upstream = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self._started:
            for t in self._threads:
                t.start()
            self._started = True

    def stop(self) -> None:
        for q in self._work:
            q.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=10)
        if self._timer is not None:
            self._timer.cancel()

    @property
    def busy_instances(self) -> int:
        return self.config.instances - len(self._idle)

    # -- slots ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Around one request's way to a batch (thread wait, reserve, preprocessing,
        commit or release): while it is on its way, an open batch that is not due yet may
        wait for it; when it is done (whatever happened), the batch need not wait."""
        self._upstream += 1
        try:
            yield
        finally:
            self._upstream -= 1
            self._dispatch()

    def reserve(self) -> Slot:
        b = self._open
        if b is None or b.closed:
            b = self._open = self._new_batch()
        slot = Slot(b, b.assigned)
        b.states[b.assigned] = _PENDING
        b.assigned += 1
        b.pending += 1
        if b.assigned == self.config.max_batch_size:
            self._close(b)
        return slot

    def commit(self, slot: Slot) -> asyncio.Future:
        b = slot.batch
        assert self._loop is not None, "Batcher.start() was not called"
        fut = self._loop.create_future()
        b.states[slot.index] = _READY
        b.futures[slot.index] = fut
        b.pending -= 1
        if b.first_ready is None:
            b.first_ready = time.perf_counter()
            if not b.closed:
                self._arm_timer(b.first_ready + self.config.max_delay_ms / 1000.0)
        self._dispatch()
        return fut

    def release(self, slot: Slot) -> None:
        b = slot.batch
        b.states[slot.index] = _HOLE
        b.pending -= 1
        self._dispatch()

    # -- forming and dispatching -----------------------------------------------------------
    def _new_batch(self) -> _Batch:
        if self._free_buffers:
            buf = self._free_buffers.pop()
        else:
            buf = np.empty((self.config.max_batch_size, *self.item_shape), dtype=self.dtype)
            self.buffers_made += 1
        return _Batch(buf)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the batch buffers made so far (each ``max_batch_size`` rows)."""
        row = int(np.prod(self.item_shape)) * self.dtype.itemsize
        return self.buffers_made * self.config.max_batch_size * row

    def drop(self) -> None:
        """After :meth:`stop`: drop the buffers and the threads (and with them the
        runtimes they ran)."""
        self._free_buffers.clear()
        self._threads = []
        self.on_batch = None  # it holds its model: no cycle left for the collector

    def _close(self, b: _Batch) -> None:
        b.closed = True
        self._closed.append(b)
        if self._open is b:
            self._open = None

    def _arm_timer(self, when: float) -> None:
        assert self._loop is not None
        delay = max(0.0, when - time.perf_counter())
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _dispatch(self) -> None:
        while self._idle:
            if not self._closed:
                b = self._open
                if b is None or b.first_ready is None:
                    return
                due = b.first_ready + self.config.max_delay_ms / 1000.0
                if self._upstream > 0 and time.perf_counter() < due:
                    self._arm_timer(due)
                    return
                self._close(b)
            b = self._closed[0]
            if b.pending:
                return  # a slot is still being written; it will commit or release
            self._closed.popleft()
            rows = b.ready_rows()
            if not rows:
                self._free_buffers.append(b.buf)
                continue
            for k, src in enumerate(rows):  # squeeze out holes left by bad requests
                if k != src:
                    b.buf[k] = b.buf[src]
            futures = [b.futures[i] for i in rows]
            instance = self._idle.pop()
            self._work[instance].put((b.buf, len(rows), futures))

    # -- instance workers -----------------------------------------------------------------
    def _worker(self, instance: int, runtime: Runtime) -> None:
        work = self._work[instance]
        while True:
            item = work.get()
            if item is None:
                return
            buf, n, futures = item
            t0 = time.perf_counter()
            try:
                outputs = runtime.run(buf[:n])
            except Exception as e:  # find the input(s) that caused it; the worker lives on
                log.warning("%s: batch of %d failed on instance %d: %s: %s",
                            self.name, n, instance, type(e).__name__, e, exc_info=True)  # fmt: skip
                try:
                    _Isolation(self, instance, runtime, buf, futures, t0).settle(e)
                except Exception:  # never leave a row unanswered (answered rows stay so)
                    log.exception("%s: finding the failing row of a batch failed", self.name)
                    self._post(self._fail, futures, partial(_batch_error, e))
            else:
                self._post(self._answer, futures, outputs,
                           self._info(runtime, instance, n, t0, time.perf_counter()))  # fmt: skip
            self._post(self._done, instance, buf)

    @staticmethod
    def _info(runtime: Runtime, instance: int, n: int, t0: float, t1: float) -> BatchInfo:
        return BatchInfo(size=n, instance=instance, infer_start=t0, infer_end=t1,
                         stages=getattr(runtime, "last_stages", None),
                         simulated=bool(getattr(runtime, "simulated", False)))  # fmt: skip

    def _post(self, fn: Callable, *args) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _answer(self, futures, outputs, info: BatchInfo, ran: BatchInfo | None = None) -> None:
        """Answer ``futures`` with their rows of ``outputs``; ``ran`` is the runtime call
        that made them (``info`` unless a rerun did), the only batch time metrics see."""
        for row, fut in enumerate(futures):
            if fut is not None and not fut.done():  # else the request gave up (deadline)
                fut.set_result(([o[row] for o in outputs], info))
        if self.on_batch is not None:
            self.on_batch(ran or info)

    @staticmethod
    def _fail(futures, error: Callable[[], BaseException]) -> None:
        """Fail ``futures`` not yet done, each with its own ``error()``."""
        for fut in futures:
            if fut is not None and not fut.done():
                fut.set_exception(error())

    def _done(self, instance: int, buf: np.ndarray) -> None:
        self._idle.append(instance)
        self._free_buffers.append(buf)
        self._dispatch()


class _Isolation:
    """After a batch's runtime call failed: find the rows that cause it, fail only those,
    answer the rest. Runs on the instance's worker thread.

    Bisection: both halves run again (a rerun is a prefix ``buf[:m]`` of the same buffer,
    m smaller than the failed batch, a size the batcher already runs whenever a batch
    leaves partly full). A half that fails is split again; a row that fails alone is
    the culprit (400 when the runtime says the input is invalid, else 500, naming it).
    When *both* halves of a failed part fail, the runtime is likely broken for every
    input (or several rows are bad): that part fails as a whole and the search stops. So
    one bad row of n costs at most 2*ceil(log2(n)) reruns, and a runtime that fails
    everything costs 2 reruns, never 2n-1.

    Rows written on the GPU (``--preprocess gpu``) live in device buffers that a rerun
    would move under themselves: such a batch fails as a whole, as before.
    """

    def __init__(self, batcher: Batcher, instance: int, runtime: Runtime, buf: np.ndarray,
                 futures: list, t0: float) -> None:  # fmt: skip
        self.batcher = batcher
        self.instance = instance
        self.runtime = runtime
        self.buf = buf
        self.futures = futures
        self.t0 = t0
        # Reruns overwrite the head of the buffer: keep the failed batch's rows.
        self.rows = buf[: len(futures)].copy()
        self.reruns = 0
        self.culprits = 0

    def settle(self, error: Exception) -> None:
        n = len(self.futures)
        if n == 1:
            self._fail_row(0, error)
        elif _device_rows(self.runtime, self.rows):
            self._fail(0, n, partial(_batch_error, error))
        else:
            self._bisect(0, n, error)
        log.warning("%s: batch of %d failed; after %d rerun(s), %d row(s) failed alone",
                    self.batcher.name, n, self.reruns, self.culprits)  # fmt: skip

    def _bisect(self, a: int, b: int, error: Exception) -> None:
        """Rows ``a:b`` failed together with ``error``."""
        if b - a == 1:
            self._fail_row(a, error)
            return
        mid = (a + b) // 2
        left, right = self._run(a, mid), self._run(mid, b)
        if left is not None and right is not None:  # broken for all, or bad on both sides
            for lo, hi, e in ((a, mid, left), (mid, b, right)):
                if hi - lo == 1:
                    self._fail_row(lo, e)
                else:
                    self._fail(lo, hi, partial(_batch_error, e))
            return
        if left is not None:
            self._bisect(a, mid, left)
        if right is not None:
            self._bisect(mid, b, right)

    def _run(self, a: int, b: int) -> Exception | None:
        """Run rows ``a:b`` alone; answer them and return None, or return the error."""
        m = b - a
        self.buf[:m] = self.rows[a:b]
        self.reruns += 1
        t = time.perf_counter()
        try:
            outputs = self.runtime.run(self.buf[:m])
        except Exception as e:
            return e
        end = time.perf_counter()
        bt = self.batcher
        ran = bt._info(self.runtime, self.instance, m, t, end)
        # The rows' infer runs from the failed call's start to the rerun that answered them.
        info = BatchInfo(size=m, instance=self.instance, infer_start=self.t0, infer_end=end,
                         simulated=ran.simulated)  # fmt: skip
        bt._post(bt._answer, self.futures[a:b], outputs, info, ran)
        return None

    def _fail(self, a: int, b: int, error: Callable[[], Exception]) -> None:
        self.batcher._post(self.batcher._fail, self.futures[a:b], error)

    def _fail_row(self, a: int, error: Exception) -> None:
        """Row ``a`` failed alone: it is a culprit."""
        self.culprits += 1
        self._fail(a, a + 1, partial(_item_error, error))


def _says_invalid_input(error: Exception) -> bool:
    """The runtime says the input itself is wrong (onnxruntime's INVALID_ARGUMENT, a
    shape or dtype check, a ValueError), not that it broke."""
    return isinstance(error, ValueError) or type(error).__name__ == "InvalidArgument"


def _item_error(error: Exception) -> RequestError:
    """The error of the one row that failed alone."""
    text = f"the runtime failed on this input: {type(error).__name__}: {error}"
    return BadRequest(text) if _says_invalid_input(error) else InferenceFailed(text)


def _batch_error(error: Exception) -> InferenceFailed:
    return InferenceFailed(f"inference failed: {type(error).__name__}: {error}")


def _device_rows(runtime: Runtime, rows: np.ndarray) -> bool:
    """Whether any row's pixels are on the GPU (a row mark, :mod:`cvserve.runtime.device_rows`)."""
    magic = getattr(getattr(runtime, "buffers", None), "magic", None)
    return isinstance(magic, bytes) and any(read_mark(r, magic) is not None for r in rows)

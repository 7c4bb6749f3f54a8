"""A CPU budget shared by the DNN stages of one pipeline.

On a small machine the stages of a pipeline fight: stage A runs in the preprocessing
pool while stage B's worker runs next to it, and if each onnxruntime session takes every
core, four requests in flight put six busy threads on two cores. A ``CpuBudget`` holds
the cores (tokens) the stages share; each DNN call takes one or more before it runs and
gives them back after. A ``BudgetedRuntime`` keeps one session per width it may run at
(one core, and the whole budget): a call runs wide only when it is alone (no other call
running or waiting, and the owner's ``pressure`` says at most one request is in flight):
then the latency of that one request is what matters. Otherwise it runs on one core:
with several requests in flight each core runs one stage's call and nothing time-slices
or waits for a straggling thread, which is what throughput needs. Calls that find no
core free wait in arrival order; that wait is reported, not hidden in ``infer``.

The split is thus decided per call from what is running, and measured: ``snapshot``
gives per stage the calls, core-seconds, mean width and time spent waiting for a core.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvserve.runtime.onnx import OrtOptions, OrtRuntime


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _StageUse:
    calls: int = 0
    core_s: float = 0.0
    busy_s: float = 0.0
    wait_s: float = 0.0
    wide_calls: int = 0


class CpuBudget:
    """``cores`` tokens shared by the stages of one pipeline; see the module docstring."""

    def __init__(self, cores: int = 0, pressure: Callable[[], int] | None = None) -> None:
        self.cores = int(cores) or available_cores()
        #: requests in flight where the budget's owner knows (a server): a call runs wide
        #: only while this is at most one
        self.pressure = pressure
        if self.cores < 1:
            raise ValueError("a CPU budget needs at least one core")
        self._free = self.cores
        self._cond = threading.Condition()
        self._line: deque[int] = deque()
        self._tickets = itertools.count()
        self._use: dict[str, _StageUse] = {}
        self._local = threading.local()

    def widest(self, max_width: int = 0) -> int:
        """The widest a call may run: ``max_width`` cores (0: all), within the budget."""
        return max(1, min(int(max_width) or self.cores, self.cores))

    @contextmanager
    def take(self, stage: str, want: int) -> Iterator[int]:
        """Hold ``want`` cores for the body if this call is alone when its turn comes
        (see the module docstring), else one; yields how many. Waits, first come first
        served, while no core is free."""
        want = max(1, min(int(want), self.cores))
        t0 = time.perf_counter()
        with self._cond:
            ticket = next(self._tickets)
            self._line.append(ticket)
            while self._line[0] != ticket or self._free == 0:
                self._cond.wait()
            self._line.popleft()
            alone = (
                self._free == self.cores
                and not self._line
                and (self.pressure is None or self.pressure() <= 1)
            )
            got = want if alone else 1
            self._free -= got
            self._cond.notify_all()  # the next in line may find a core too
        t1 = time.perf_counter()
        try:
            yield got
        finally:
            t2 = time.perf_counter()
            with self._cond:
                self._free += got
                use = self._use.setdefault(stage, _StageUse())
                use.calls += 1
                use.wide_calls += got > 1
                use.core_s += got * (t2 - t1)
                use.busy_s += t2 - t1
                use.wait_s += t1 - t0
                self._cond.notify_all()
            self._local.waited = getattr(self._local, "waited", 0.0) + (t1 - t0)

    def pop_waited(self) -> float:
        """Seconds this thread has waited for cores since it last asked (then zero)."""
        waited = getattr(self._local, "waited", 0.0)
        self._local.waited = 0.0
        return waited

    def snapshot(self) -> dict:
        """Per stage since start: calls, core-seconds, seconds running and waiting for
        a core, mean width (cores per call, time-weighted) and the share of calls that
        ran wide."""
        with self._cond:
            stages = {
                name: {
                    "calls": u.calls,
                    "core_s": round(u.core_s, 3),
                    "busy_s": round(u.busy_s, 3),
                    "wait_s": round(u.wait_s, 3),
                    "mean_width": round(u.core_s / u.busy_s, 2) if u.busy_s else None,
                    "wide_share": round(u.wide_calls / u.calls, 3) if u.calls else None,
                }
                for name, u in sorted(self._use.items())
            }
            return {"cores": self.cores, "free": self._free, "stages": stages}


class BudgetedRuntime:
    """One model under a ``CpuBudget``: a one-core session, and one as wide as the
    budget allows (``max_width``; 0: the whole budget). Same ``run`` as ``OrtRuntime``."""

    def __init__(
        self,
        path: str | Path,
        budget: CpuBudget,
        stage: str,
        max_width: int = 0,
        options: OrtOptions | None = None,
    ) -> None:
        from dataclasses import replace

        self.budget = budget
        self.stage = stage
        options = options or OrtOptions()
        self.max_width = budget.widest(max_width)
        self.sessions = {
            w: OrtRuntime(path, replace(options, intra_op_threads=w))
            for w in sorted({1, self.max_width})
        }
        narrow = self.sessions[1]
        self.input_name = narrow.input_name
        self.input_shape = narrow.input_shape
        self.input_dtype = narrow.input_dtype
        self.output_names = narrow.output_names

    @property
    def widths(self) -> list[int]:
        return sorted(self.sessions)

    def output_signature(self, item_shape: tuple[int, ...]) -> list[tuple[str, str, tuple]]:
        return self.sessions[1].output_signature(item_shape)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        with self.budget.take(self.stage, self.max_width) as got:
            return self.sessions[got].run(batch)

"""``cvserve serve`` in a child process for the tests of the server front (shutdown, keys,
TLS, logs, start-up): its output in a file, readiness polled, never a fixed sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cvserve.serving.process import free_port

MODEL = "tiny-resnet"
PREDICT = f"/v1/models/{MODEL}:predict"
#: The simulated accelerator at 1.5 s a batch of one: a request stays in flight long enough.
SLOW = ["--runtime", "simulated", "--sim-profile", "1:1500", "--max-batch-size", "1"]


def stop_processes(*procs: subprocess.Popen) -> None:
    """SIGTERM each process still running, then wait for it (killed after 30 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_worker(args: list[str], timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """``cvserve worker ARGS`` in a child process (its output a pipe, stderr merged), once
    it says it serves: ``(process, that "worker: ..." line)``; stop it with
    :func:`stop_processes`."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "cvserve", "worker", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = ""
    deadline = time.monotonic() + timeout
    try:
        while not started.startswith("worker: ") and time.monotonic() < deadline:
            line = worker.stdout.readline()
            assert line or worker.poll() is None, "worker exited"
            started = line
        assert started.startswith("worker: "), f"the worker did not start in {timeout} s"
    except BaseException:
        stop_processes(worker)
        raise
    return worker, started


def wait_for(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(0.02)


class Served:
    """One server process; ``args`` go after ``serve`` (``--model`` and ``--cache-dir``
    are added unless given), ``verbose`` adds ``-v``."""

    def __init__(
        self,
        log_dir: Path,
        cache: Path | None,
        *args: str,
        port: int | None = None,
        verbose: bool = False,
        scheme: str = "http",
    ) -> None:
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "cvserve", *(["-v"] if verbose else []), "serve",
               "--port", str(self.port), *args]  # fmt: skip
        if "--model" not in args and "--config" not in args:
            cmd += ["--model", MODEL]
        if cache is not None and "--cache-dir" not in args:
            cmd += ["--cache-dir", str(cache)]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.output().splitlines() if needle in line]

    def wait_ready(self, timeout: float = 120, **client) -> Served:
        def ready() -> bool:
            assert self.proc.poll() is None, self.output()
            try:
                return httpx.get(self.url + "/readyz", timeout=1, **client).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, "readiness")
        return self

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.sigterm()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

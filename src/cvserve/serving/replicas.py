"""``cvserve serve --workers N``: N server processes on one port, and a parent that starts,
watches and stops them (as ``uvicorn --workers`` and gunicorn name it). In the code each
such process is a *replica*: "worker" elsewhere in cvserve means a pipeline stage process
(``cvserve worker``); the flag, the config key and the log lines keep uvicorn's word.

Why SO_REUSEPORT, not a parent that accepts and hands connections out: every process
listens on the port itself (``--reuse-port``) and the kernel spreads new connections
over the listeners, so a request never passes through the parent (no extra hop, no file
descriptors sent over a socket, nothing to balance by hand), a process joins the port only
once its models are loaded, and one that leaves (drains, dies) stops getting connections
at once. The parent only supervises. The cost: the kernel balances connections, not
requests, so a few long keep-alive connections can land on one process (HTTP load
balancers open many).

The parent:

- checks the ports first (a port in use is a one-line error within a second, before any
  process starts), and holds the main port bound (not listening) so that no server
  without SO_REUSEPORT takes it meanwhile;
- starts N children, each ``cvserve serve`` with the parent's settings (JSON, never
  pickle; :func:`replica_config`) read from a pipe the child inherits (``--config
  /dev/fd/N``): the settings hold the broker URL and its password, so they are never
  written to a file (one in the temporary folder would outlive a SIGKILLed parent) nor put
  on a command line (``ps`` shows it to every user), in a session of their own (a terminal's
  Ctrl-C reaches only the parent, which passes it on once). A child loads its own models:
  nothing loaded is inherited. Threads are sized so that N processes fit the cores:
  preprocessing threads, onnxruntime intra-op threads and a pipeline's CPU budget default
  to cores / N each (at least 1), unless set;
- says ``ready on URL`` once every child has loaded and joined the port;
- keeps every child's models the same (``serving.control``): a load or unload made
  through one child's API, and the settings the parent rereads on SIGHUP, are lines of a
  control file (``CVSERVE_CONTROL_FILE``) that every child follows within 0.2 s, and that
  a replacement child replays from the first line;
- forwards SIGTERM/SIGINT to every child, each of which drains as one server does (see
  :mod:`cvserve.serving.server`), and exits once all are gone: 0 when every child
  exited 0;
- when a child dies during start-up, stops the others and exits with its status;
- when a child dies later, logs it (its status, its pid) and starts another in its place,
  as gunicorn does: at once the first time, then after 1, 2, 4 ... 30 s while
  replacements keep dying before they are ready. The port is served by the others
  meanwhile; requests in flight on the dead process are lost with it.

Metrics: the parent gives its children a fresh ``PROMETHEUS_MULTIPROC_DIR`` (removed at
exit), so the ``/metrics`` of any child counts every child's requests
(:mod:`cvserve.serving.metrics`). With ``metrics_port`` the parent serves that port
itself: ``/metrics`` (every child), ``/healthz`` and ``/readyz`` (ready once every child
has been, and while at least one is and none is draining). The gRPC door is not shared:
``grpc_port`` with ``workers`` > 1 is a configuration error.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cvserve.config import ServerConfig, config_to_dict, default_pixels_in_flight
from cvserve.serving.control import CONTROL_FILE_ENV

log = logging.getLogger(__name__)

__all__ = ["die_with_parent", "metrics_dir", "run_replicas", "replica_config"]

#: Restart delays of a child whose replacements keep dying before they are ready.
_BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
_TICK_S = 0.1
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def replica_config(config: ServerConfig, cores: int | None = None) -> ServerConfig:
    """The settings of each of ``config.workers`` processes: one process on the shared
    port, with the thread counts left at 0 (automatic) sized for ``cores / workers``."""
    from cvserve.runtime.budget import available_cores

    n = config.workers
    share = max(1, (cores or available_cores()) // n)
    models = tuple(
        mc
        if mc.intra_op_threads or mc.device != "cpu" or mc.runtime != "onnxruntime"
        else replace(mc, intra_op_threads=max(1, share // mc.batching.instances))
        for mc in config.models
    )
    pipelines = tuple(pc if pc.cores else replace(pc, cores=share) for pc in config.pipelines)
    pixels = config.max_pixels_in_flight or max(
        config.max_pixels, default_pixels_in_flight(config.max_pixels) // n
    )
    return replace(
        config,
        workers=1,
        reuse_port=True,
        preprocess_threads=config.preprocess_threads or share,
        max_pixels_in_flight=pixels,
        models=models,
        pipelines=pipelines,
    )


def metrics_dir() -> str | None:
    """In a child: the multiprocess metrics directory its parent made."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def die_with_parent() -> None:
    """In a child: SIGTERM (a drain) when the parent dies, even by SIGKILL (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError) as e:
        log.debug("no parent-death signal (%s)", e)
        return
    if os.getppid() == 1:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen
    ready_fd: int | None
    ready: bool = False
    url: str | None = None


class _Supervisor:
    """The parent's state and loop (see the module docstring)."""

    def __init__(self, config: ServerConfig, verbose: bool = False) -> None:
        from cvserve.serving.sockets import bind_socket

        self.config = config
        self.n = config.workers
        self.verbose = verbose
        # the ports first, before any child starts: a port in use is the parent's one line
        self.port_sock = bind_socket(config.host, config.port, reuse_port=True, listen=False)
        self.port = self.port_sock.getsockname()[1]
        self.metrics_sock = None
        if config.metrics_port is not None:
            try:
                self.metrics_sock = bind_socket(config.host, config.metrics_port)
            except OSError:
                self.port_sock.close()
                raise
        self.tmp = Path(tempfile.mkdtemp(prefix="cvserve-replicas-"))
        self.metrics_dir = self.tmp / "metrics"
        self.metrics_dir.mkdir()
        #: Model changes every child follows (``serving.control``): one JSON line each.
        self.control = self.tmp / "control"
        self.control.touch()
        self.reread: Callable[[], ServerConfig] | None = None
        child_cfg = replace(replica_config(config), port=self.port)
        self.settings = json.dumps(config_to_dict(child_cfg)).encode()
        self.children: dict[int, _Child] = {}
        self.failures = dict.fromkeys(range(self.n), 0)
        self.restart_at: dict[int, float] = {}
        self.signals: list[int] = []
        self.stopping = False
        self.announced = False
        self.failed: int | None = None
        self.codes: list[int] = []
        self._http: ThreadingHTTPServer | None = None

    # -- children -------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        r, w = os.pipe()
        settings_r, settings_w = os.pipe()
        cmd = [sys.executable, "-m", "cvserve", *(["-v"] if self.verbose else []), "serve",
               "--config", f"/dev/fd/{settings_r}", "--host", self.config.host,
               "--port", str(self.port), "--worker-index", str(index), "--ready-fd", str(w)]  # fmt: skip
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
               CONTROL_FILE_ENV: str(self.control)}  # fmt: skip
        try:
            proc = subprocess.Popen(cmd, pass_fds=(w, settings_r), env=env, start_new_session=True)
        except BaseException:
            os.close(settings_w)
            raise
        finally:
            os.close(w)
            os.close(settings_r)
        # a thread: settings larger than the pipe's buffer wait for the child to read them
        threading.Thread(
            target=_write_and_close, args=(settings_w, self.settings), daemon=True
        ).start()
        os.set_blocking(r, False)
        self.children[index] = _Child(index, proc, r)
        log.info("worker %d started (pid %d)", index, proc.pid)

    def _read_ready(self, timeout: float) -> None:
        fds = {c.ready_fd: c for c in self.children.values() if c.ready_fd is not None}
        if not fds:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(fds), [], [], timeout)
        for fd in readable:
            child = fds[fd]
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not data:  # the child closed it (exited)
                os.close(fd)
                child.ready_fd = None
            elif not child.ready:
                child.ready = True
                child.url = data.decode(errors="replace").splitlines()[0]
                self.failures[child.index] = 0
                if self.announced:
                    log.info("worker %d ready again (pid %d)", child.index, child.proc.pid)

    def _reap(self) -> None:
        from prometheus_client import multiprocess

        for child in list(self.children.values()):
            rc = child.proc.poll()
            if rc is None:
                continue
            del self.children[child.index]
            if child.ready_fd is not None:
                os.close(child.ready_fd)
            multiprocess.mark_process_dead(child.proc.pid, str(self.metrics_dir))
            what = f"worker {child.index} (pid {child.proc.pid}) exited with status {rc}"
            if self.stopping or self.failed is not None:
                self.codes.append(rc)
                (log.info if rc == 0 else log.warning)(what)
            elif not self.announced:
                log.error("%s while starting: stopping the others", what)
                self.failed = rc if rc > 0 else 1
                self._stop_children(failed=True)
            else:
                k = self.failures[child.index]
                self.failures[child.index] = k + 1
                delay = _BACKOFF_S[min(k, len(_BACKOFF_S) - 1)]
                log.error("%s; starting another in its place in %g s", what, delay)
                self.restart_at[child.index] = time.monotonic() + delay

    def _stop_children(self, failed: bool = False) -> None:
        """SIGTERM (drain) to every child; at a failed start-up, SIGKILL to those that
        have not joined the port yet (they have served nothing)."""
        self.restart_at.clear()
        for child in self.children.values():
            sig = signal.SIGKILL if failed and not child.ready else signal.SIGTERM
            try:
                child.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    # -- the loop -------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def run(self, on_ready: Callable[[str], None] | None) -> int:
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        try:
            for i in range(self.n):
                self.spawn(i)
            self._serve_metrics()
            while self.children or (self.restart_at and not self.stopping):
                self._read_ready(_TICK_S)
                self._handle_signals()
                self._reap()
                now = time.monotonic()
                for index, at in list(self.restart_at.items()):
                    if now >= at and not self.stopping:
                        del self.restart_at[index]
                        self.spawn(index)
                if not self.announced and self.failed is None and not self.stopping:
                    if len(self.children) == self.n and all(
                        c.ready for c in self.children.values()
                    ):
                        self.announced = True
                        self._announce(on_ready)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._close()
        if self.failed is not None:
            return self.failed
        return 0 if all(rc == 0 for rc in self.codes) else 1

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
                continue
            if not self.stopping:
                log.info("stopping: draining %d workers", len(self.children))
            self.stopping = True
            self.restart_at.clear()
            for child in self.children.values():  # a second signal: they exit at once
                try:
                    child.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _reload(self) -> None:
        """SIGHUP: reread the settings and hand them to every child through the control
        file; each applies the difference to its models (``Repository.apply_config``)."""
        if self.reread is None:
            log.warning("SIGHUP: no config file to reread (serve --config FILE)")
            return
        try:
            new = replace(replica_config(self.reread()), port=self.port)
        except Exception as e:  # a bad file: the children keep serving what they serve
            log.error("config reload failed, nothing changed: %s", e)
            return
        line = json.dumps({"pid": 0, "op": "config", "config": config_to_dict(new)})
        with open(self.control, "a") as f:
            f.write(line + "\n")
        log.info("config reloaded: every worker applies it")

    def _announce(self, on_ready: Callable[[str], None] | None) -> None:
        log.info("%d workers ready on port %d (SO_REUSEPORT)", self.n, self.port)
        if on_ready is None:
            return
        first = next(iter(self.children.values()))
        on_ready(first.url or f"http://{self.config.host}:{self.port}")
        if self.metrics_sock is not None:
            host, port = self.metrics_sock.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            on_ready(f"http://{host}:{port}/metrics")

    def _close(self) -> None:
        for child in self.children.values():  # only after an error in the loop itself
            child.proc.kill()
            child.proc.wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        elif self.metrics_sock is not None:
            self.metrics_sock.close()
        self.port_sock.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the metrics port -----------------------------------------------------------------
    def readiness(self) -> tuple[int, dict]:
        ready = sum(c.ready for c in self.children.values())
        body: dict = {"workers": self.n, "workers_ready": ready}
        if self.stopping or self.failed is not None:
            return 503, {"ready": False, "reason": "draining", **body}
        if not self.announced:
            return 503, {"ready": False, "reason": "loading", **body}
        if not ready:
            return 503, {"ready": False, "reason": "no worker is ready", **body}
        return 200, {"ready": True, **body}

    def _serve_metrics(self) -> None:
        if self.metrics_sock is None:
            return
        self.metrics_sock.setblocking(True)
        server = ThreadingHTTPServer(
            self.metrics_sock.getsockname()[:2], _handler(self), bind_and_activate=False
        )
        server.socket.close()
        server.socket = self.metrics_sock
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._http = server


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:  # the child died before it read them: its exit is reported
        log.debug("a replica did not read its settings: %s", e)


def _handler(sup: _Supervisor) -> type[BaseHTTPRequestHandler]:
    from cvserve.serving.metrics import CONTENT_TYPE, render_multiprocess

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, render_multiprocess(str(sup.metrics_dir)), CONTENT_TYPE)
            elif path == "/healthz":
                self._json(200, {"status": "ok"})
            elif path == "/readyz":
                self._json(*sup.readiness())
            else:
                self._json(404, {"error": {"kind": "not_found", "message": "Not Found"}})

        def _json(self, status: int, payload: dict) -> None:
            body = json.dumps(payload, separators=(",", ":")).encode()
            self._send(status, body, "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002
            pass  # no access log, as on the main port

    return Handler


def run_replicas(
    config: ServerConfig,
    on_ready: Callable[[str], None] | None = None,
    verbose: bool = False,
    reread: Callable[[], ServerConfig] | None = None,
) -> int:
    """Serve ``config`` with ``config.workers`` processes until a signal; blocks the main
    thread and returns the exit status (see the module docstring). OSError when a port
    cannot be had (before any process starts). ``reread``: the settings again, on SIGHUP."""
    sup = _Supervisor(config, verbose)
    sup.reread = reread
    return sup.run(on_ready)

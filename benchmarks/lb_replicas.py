"""Replicas behind HAProxy: a rolling restart under load, as a client of the balancer sees it.

R ``cvserve serve`` replicas, each on its own loopback port, behind HAProxy (found on
PATH, or ``--haproxy``), which health-checks ``GET /readyz`` on each. Closed-loop clients
(rolling_restart.py's load loop: ``--concurrency`` threads posting the medium photos)
talk to HAProxy only. Mid-run every replica in turn gets SIGTERM, exits, is replaced by a
new process on the same port, and is back in HAProxy's rotation (HAProxy says UP, not
only its own ``/readyz``) before the next one goes. Counted: every request's outcome at
the client (a status, or a transport error: refused / lost), and HAProxy's own view from
its stats socket (retries, redispatches, the 5xx the replicas sent and the 5xx the
clients got).

Why nothing should be lost (server.py's docstring has the replica's side): on SIGTERM a
replica fails ``/readyz`` at once and keeps serving for ``--drain-delay`` s; the health
check (``inter``/``fastinter``/``fall`` set so that a failing replica is out within half
the drain delay) takes it out of the rotation before it stops serving. Whatever still
reaches it later (a 503 ``draining``, a connection closed before an answer, a refused
connection) is retried by HAProxy on another replica (``retry-on``, ``option
redispatch``). Retrying a POST is safe here only because a prediction is idempotent: the
same image gives the same answer and changes no state. L7 retries need the whole request
in one buffer, so ``tune.bufsize`` is sized to the largest image.

    python benchmarks/lb_replicas.py --replicas 3 --model resnet18 --repeats 3
    python benchmarks/lb_replicas.py --quick

Writes benchmarks/results/lb_replicas.json (--quick: a file in the temporary folder,
never the committed result) and prints a table within 80 columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rolling_restart import LOST, load, serve_args  # a sibling script: benchmarks/ is sys.path[0]

from cvserve.bench.console import fit_table
from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "lb_replicas.json"
#: --quick is a smoke test: its result goes beside the system's temporary files
QUICK_RESULT = Path(tempfile.gettempdir()) / "lb_replicas-quick.json"
BACKEND = "replicas"
FRONTEND = "cvserve"
FALL = RISE = 2
#: HAProxy's retry-on: what surely did no work on the replica (see the module docstring).
RETRY_ON = "conn-failure empty-response 503"
#: HAProxy's counters kept in the result (``show stat`` columns).
COUNTERS = ("req_tot", "hrsp_2xx", "hrsp_4xx", "hrsp_5xx", "wretr", "wredis", "econ",
            "eresp", "ereq", "dresp", "chkfail", "chkdown", "downtime")  # fmt: skip


class HAProxyMissing(RuntimeError):
    pass


def find_haproxy(given: str | None) -> str:
    exe = shutil.which(given or "haproxy")
    if exe is None:
        raise HAProxyMissing(
            f"{given or 'haproxy'} not found on PATH: install it (Debian/Ubuntu: "
            "apt-get install haproxy; it is in /usr/sbin) or pass --haproxy PATH"
        )
    return exe


def haproxy_version(exe: str) -> str:
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10).stdout
    return out.split("\n", 1)[0].removeprefix("HAProxy version ").split(" ", 1)[0]


def check_timing(drain_delay: float) -> dict[str, int]:
    """Health-check intervals (ms) that take a failing replica out within half the drain
    delay: the first failed check comes within ``inter``, the next ``fall - 1`` within
    ``fastinter`` each."""
    inter = min(2.0, max(0.1, drain_delay / 3 if drain_delay > 0 else 0.5))
    return {"inter": round(inter * 1000), "fastinter": round(inter * 500),
            "downinter": round(inter * 1000), "fall": FALL, "rise": RISE}  # fmt: skip


def haproxy_config(port: int, replicas: list[int], sock: Path, bufsize: int,
                   timing: dict[str, int], retry_on: str = RETRY_ON) -> str:  # fmt: skip
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(replicas))
    return f"""\
global
    maxconn 1024
    stats socket {sock} mode 600 level admin
    # L7 retries (retry-on below) only replay a request that fits in one buffer:
    # sized to hold the largest image sent
    tune.bufsize {bufsize}

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout queue 30s
    timeout check 1s
    # Retry on another replica when the request surely did no work there: the
    # connection failed, it was closed without an answer, or the replica said 503
    # (draining). Safe for POST only because a prediction is idempotent (same image,
    # same answer, no state changed). Never on a timeout: a slow inference retried
    # elsewhere doubles the load.
    retries 3
    option redispatch 1
    retry-on {retry_on}
    option http-buffer-request

frontend {FRONTEND}
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    # out within inter + (fall - 1) * fastinter of the first failing /readyz
    default-server check inter {timing["inter"]}ms fastinter {timing["fastinter"]}ms \
downinter {timing["downinter"]}ms fall {timing["fall"]} rise {timing["rise"]}
{servers}
"""


def show_stat(sock: Path) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat`` over its stats socket: rows by ``pxname/svname``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return {f"{r['pxname']}/{r['svname']}": r for r in csv.DictReader(io.StringIO(text))}


def counters(row: dict[str, str]) -> dict[str, int]:
    return {k: int(row[k]) for k in COUNTERS if row.get(k, "") != ""}


class HAProxy:
    """HAProxy in the foreground, and what its stats socket says."""

    def __init__(self, exe: str, workdir: Path, config: str) -> None:
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(config)
        self.sock = workdir / "haproxy.sock"
        self.log = (workdir / "haproxy.log").open("w+b")
        check = subprocess.run([exe, "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects the configuration:\n{check.stdout}{check.stderr}")
        self.proc = subprocess.Popen([exe, "-db", "-f", str(self.cfg)],
                                     stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stat(self) -> dict[str, dict[str, str]]:
        return show_stat(self.sock)

    def status(self) -> dict[str, str]:
        return {k.split("/", 1)[1]: r["status"] for k, r in self.stat().items()
                if k.startswith(f"{BACKEND}/") and k != f"{BACKEND}/BACKEND"}  # fmt: skip

    def wait(self, want: str, servers: list[str], timeout: float = 120.0) -> None:
        """Until every one of ``servers`` has status ``want`` (exactly: "UP", "DOWN")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.output()}")
            try:
                st = self.status()
                if all(st.get(s) == want for s in servers):
                    return
            except OSError:
                pass  # the stats socket is not there yet
            time.sleep(0.05)
        raise TimeoutError(f"haproxy: {servers} not {want} after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def watch(lb: HAProxy, stop: threading.Event, out: list[tuple[float, str, str]]) -> None:
    """Record every change of a replica's status in HAProxy's eyes."""
    last: dict[str, str] = {}
    while not stop.is_set():
        try:
            st = lb.status()
        except OSError:
            st = {}
        now = time.monotonic()
        for sv, status in st.items():
            if last.get(sv) != status:
                out.append((now, sv, status))
                last[sv] = status
        time.sleep(0.02)


def first_after(events: list[tuple[float, str, str]], sv: str, t0: float, status: str):
    return next((t - t0 for t, s, st in events if s == sv and st == status and t >= t0), None)


def run_once(a: argparse.Namespace, exe: str, images: list[bytes]) -> dict:
    ports = [free_port() for _ in range(a.replicas)]
    names = [f"r{i}" for i in range(a.replicas)]
    lb_port = free_port()
    args = serve_args(a, "after-exit", 0)  # each replica has its own port: no reuse-port
    timing = check_timing(a.drain_delay)
    bufsize = 1 << max(16, (max(map(len, images)) + 65536 - 1).bit_length())
    with tempfile.TemporaryDirectory(prefix="cvserve-lb-") as tmp:
        config = haproxy_config(
            lb_port, ports, Path(tmp) / "haproxy.sock", bufsize, timing, a.retry_on
        )
        replicas = [ServerProcess(args, port=p) for p in ports]
        lb = None
        outcomes: list[tuple[float, str]] = []
        events: list[tuple[float, str, str]] = []
        lock, stop, stop_watch = threading.Lock(), threading.Event(), threading.Event()
        url = f"http://127.0.0.1:{lb_port}"
        clients = [threading.Thread(target=load, args=(url, a.model, images, k, stop, outcomes, lock))
                   for k in range(a.concurrency)]  # fmt: skip
        watcher = None
        restarts = []
        try:
            with ThreadPoolExecutor(a.replicas) as ex:  # load the models side by side
                list(ex.map(ServerProcess.start, replicas))
            lb = HAProxy(exe, Path(tmp), config)
            lb.wait("UP", names, 30)
            watcher = threading.Thread(target=watch, args=(lb, stop_watch, events))
            watcher.start()
            t_load = time.monotonic()
            for t in clients:
                t.start()
            time.sleep(a.before)
            for i, port in enumerate(ports):
                t0 = time.monotonic()
                code = replicas[i].stop(120)
                t_exit = time.monotonic()
                replicas[i] = ServerProcess(args, port=port).start()
                t_ready = time.monotonic()
                lb.wait("UP", [names[i]], 60)
                t_up = time.monotonic()
                restarts.append({
                    "replica": names[i],
                    "sigterm_at_s": round(t0 - t_load, 3),
                    "haproxy_down_after_s": first_after(events, names[i], t0, "DOWN"),
                    "old_exit_after_s": round(t_exit - t0, 3),
                    "old_exit_code": code,
                    "new_ready_after_s": round(t_ready - t0, 3),
                    "haproxy_up_after_s": round(t_up - t0, 3),
                })  # fmt: skip
            time.sleep(a.after)
        finally:
            stop.set()
            for t in clients:
                if t.is_alive():
                    t.join(60)
            t_end = time.monotonic()
            stop_watch.set()
            if watcher is not None:
                watcher.join(10)
            stats = lb.stat() if lb is not None and lb.proc.poll() is None else {}
            if lb is not None:
                lb.stop()
            for r in replicas:
                r.stop()
    for r in restarts:
        if r["haproxy_down_after_s"] is not None:
            r["haproxy_down_after_s"] = round(r["haproxy_down_after_s"], 3)
    counts = Counter(w for _, w in outcomes)
    lost = sum(counts[k] for k in LOST)
    fe = counters(stats.get(f"{FRONTEND}/FRONTEND", {}))
    be = counters(stats.get(f"{BACKEND}/BACKEND", {}))
    row = {
        "requests": len(outcomes),
        "throughput_rps": round(len(outcomes) / (t_end - t_load), 1),
        "outcomes": dict(counts),
        "ok": counts["200"],
        "non_200": sum(v for k, v in counts.items() if k.isdigit() and k != "200"),
        "refused": counts["refused"],
        "lost": lost,
        "transport_errors": lost + counts["refused"],
        "haproxy": {
            "frontend": fe,
            "backend": be,
            "servers": {n: counters(stats.get(f"{BACKEND}/{n}", {})) for n in names},
        },
        "restarts": restarts,
        "status_changes": [(round(t - t_load, 3), sv, st) for t, sv, st in events],
        "first_errors": [(round(t - t_load, 3), w) for t, w in outcomes if w != "200"][:20],
        "haproxy_cfg": config,
    }
    replica_5xx = sum(s.get("hrsp_5xx", 0) for s in row["haproxy"]["servers"].values())
    print(_summary_line(row, be, fe, replica_5xx), file=sys.stderr, flush=True)
    return row


def results_table(rows: list[dict], title: str):  # noqa: ANN201
    """One line per run, within 80 columns (the caption names the short headers)."""
    cells = []
    for i, r in enumerate(rows):
        h = r["haproxy"]
        downs = [x["haproxy_down_after_s"] for x in r["restarts"]
                 if x["haproxy_down_after_s"] is not None]  # fmt: skip
        cells.append([
            i + 1, r["requests"], r["throughput_rps"], r["ok"], r["non_200"], r["refused"],
            r["lost"], h["backend"].get("wretr", 0), h["backend"].get("wredis", 0),
            sum(s.get("hrsp_5xx", 0) for s in h["servers"].values()),
            h["frontend"].get("hrsp_5xx", 0), f"{max(downs):.2f}" if downs else "-",
        ])  # fmt: skip
    headers = ("run", "reqs", "req/s", "200", "other", "refused", "lost", "retry", "redisp",
               "5xx in", "5xx out", "out s")  # fmt: skip
    caption = [
        "other: answers that were not 200; refused: connections refused; lost: no answer.",
        "retry, redisp: HAProxy's retries and redispatches; 5xx in: from the replicas, 5xx "
        "out: to the clients; out s: the longest time from a replica's SIGTERM to HAProxy "
        "taking it out of the rotation.",
    ]
    return fit_table(headers, cells, title=title, caption=caption)


def _summary_line(row: dict, be: dict, fe: dict, replica_5xx: int) -> str:
    """The run's outcome, wrapped at 80 columns."""
    return textwrap.fill(
        f"{row['requests']} requests through haproxy, {row['ok']} ok, {row['non_200']} other "
        f"status, {row['transport_errors']} transport errors ({row['lost']} lost); haproxy: "
        f"{be.get('wretr', 0)} retries, {be.get('wredis', 0)} redispatches, {replica_5xx} x 5xx "
        f"from replicas, {fe.get('hrsp_5xx', 0)} x 5xx to clients",
        80,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--model", default="tiny-resnet", help="tiny-resnet (default) or resnet18")
    p.add_argument("--images", default=str(HERE.parent.parent / "shared/data/images/medium"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--drain-delay", type=float, default=2.0, help="each replica's, seconds")
    p.add_argument("--before", type=float, default=4.0, help="seconds of load before restarting")
    p.add_argument("--after", type=float, default=3.0, help="seconds of load after the last one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--retry-on",
        default=RETRY_ON,
        help=f"HAProxy's retry-on ('none' to see what retries save; default: {RETRY_ON})",
    )
    p.add_argument("--haproxy", default=None, help="the haproxy executable (default: on PATH)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true",
                   help="2 replicas, 4 clients, 1 s drain delay, 1 repeat (a smoke test)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help=f"result file (default {RESULT}; with --quick {QUICK_RESULT}, so a "
                   "smoke test never replaces the committed result)")  # fmt: skip
    a = p.parse_args()
    if a.quick:
        a.replicas, a.concurrency, a.drain_delay = 2, 4, 1.0
        a.before, a.after, a.repeats = 1.0, 1.0, 1
    a.out = a.out or str(QUICK_RESULT if a.quick else RESULT)
    if a.replicas < 2:
        p.error("--replicas: at least 2 (one must serve while another restarts)")
    try:
        exe = find_haproxy(a.haproxy)
    except HAProxyMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    version = haproxy_version(exe)
    store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    images = [f.read_bytes() for f in sorted(Path(a.images).glob("*.jpg"))]
    if not images:
        p.error(f"--images: no .jpg files in {a.images}")
    rows = [run_once(a, exe, images) for _ in range(a.repeats)]

    title = (f"rolling restart of {a.replicas} replicas behind HAProxy {version}, {a.model}, "
             f"c={a.concurrency}, drain delay {a.drain_delay:g} s")  # fmt: skip
    Console().print(results_table(rows, title))
    summary = {
        "haproxy_version": version,
        "runs": len(rows),
        "requests_total": sum(r["requests"] for r in rows),
        "non_200_total": sum(r["non_200"] for r in rows),
        "transport_errors_total": sum(r["transport_errors"] for r in rows),
        "lost_total": sum(r["lost"] for r in rows),
        "retries_total": sum(r["haproxy"]["backend"].get("wretr", 0) for r in rows),
        "redispatches_total": sum(r["haproxy"]["backend"].get("wredis", 0) for r in rows),
        "throughput_rps_median": statistics.median(r["throughput_rps"] for r in rows),
        "haproxy_down_after_sigterm_s_max": max(
            (x["haproxy_down_after_s"] or 0.0 for r in rows for x in r["restarts"]), default=None
        ),
        "health_check": check_timing(a.drain_delay),
    }
    out = write_benchmark(a.out, "lb_replicas", a, summary=summary, runs=rows)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

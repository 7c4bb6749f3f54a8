"""A rolling restart under load: what the clients see when a server is replaced.

One cvserve server on a port under closed-loop load (``--concurrency`` threads, each an
``httpx.Client`` with keep-alive, posting the medium photos); mid-run it gets SIGTERM and
a replacement takes over the same port. Every request's outcome is counted: an HTTP
status, or a transport error, split into ``refused`` (the connection was never accepted:
nothing was sent, a client can retry safely) and ``lost`` (the request may have been sent
and no answer came: reset, closed without a response, timed out).

Two ways to hand the port over (``--mode``):

* ``reuseport``: the replacement binds the same port with ``SO_REUSEPORT``
  (``cvserve serve --reuse-port``) and joins the port once its models are loaded; only
  then does the old server get SIGTERM. No moment without a listener.
* ``after-exit``: SIGTERM first, the replacement starts on the port once the old server
  has exited (what a plain restart does); connections in the gap are refused.

    python benchmarks/rolling_restart.py --mode reuseport --drain-delay 2 --repeats 3
    python benchmarks/rolling_restart.py --mode after-exit --model resnet18

Writes benchmarks/results/rolling_restart.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
LOST = ("reset", "disconnected", "timeout", "other")


def classify(e: Exception) -> str:
    if isinstance(e, httpx.ConnectError):
        return "refused"
    if isinstance(e, httpx.RemoteProtocolError):
        return "disconnected"  # the server closed the connection without an answer
    if isinstance(e, httpx.ReadError | httpx.WriteError):
        return "reset"
    if isinstance(e, httpx.TimeoutException):
        return "timeout"
    return "other"


def load(url: str, model: str, images: list[bytes], k: int, stop: threading.Event,
         out: list[tuple[float, str]], lock: threading.Lock) -> None:  # fmt: skip
    """One closed-loop client: a request, its outcome, the next request."""
    i = k
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            t = time.monotonic()
            try:
                r = c.post(f"/v1/models/{model}:predict", content=images[i % len(images)],
                           headers={"content-type": "image/jpeg"})  # fmt: skip
                what = str(r.status_code)
            except httpx.TransportError as e:
                what = classify(e)
            with lock:
                out.append((t, what))
            i += 1
            if what == "refused":
                time.sleep(0.02)  # nobody listens: do not spin


def serve_args(a: argparse.Namespace, mode: str, metrics_port: int) -> list[str]:
    args = ["--model", a.model, "--max-batch-size", "8", "--max-delay-ms", "5"]
    if a.cache_dir:
        args += ["--cache-dir", a.cache_dir]
    if a.drain_delay:
        args += ["--drain-delay-ms", f"{a.drain_delay * 1000:g}"]
    if mode == "reuseport":
        args += ["--reuse-port", "--metrics-port", str(metrics_port)]
    return args


def run_once(a: argparse.Namespace, mode: str, images: list[bytes]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ports = {"old": free_port(), "new": free_port()}
    ready = {n: f"http://127.0.0.1:{p}/readyz" if mode == "reuseport" else f"{url}/readyz"
             for n, p in ports.items()}  # fmt: skip
    old = ServerProcess(serve_args(a, mode, ports["old"]), port=port).start(ready_url=ready["old"])
    outcomes: list[tuple[float, str]] = []
    lock, stop = threading.Lock(), threading.Event()
    clients = [threading.Thread(target=load, args=(url, a.model, images, k, stop, outcomes, lock))
               for k in range(a.concurrency)]  # fmt: skip
    for t in clients:
        t.start()
    time.sleep(a.before)
    marks: dict[str, float] = {}
    new = None
    try:
        if mode == "reuseport":
            new = ServerProcess(serve_args(a, mode, ports["new"]), port=port)
            new.start(ready_url=ready["new"])
            marks["sigterm"] = time.monotonic()
            code = old.stop(120)
            marks["old_exit"] = time.monotonic()
        else:
            marks["sigterm"] = time.monotonic()
            code = old.stop(120)
            marks["old_exit"] = time.monotonic()
            new = ServerProcess(serve_args(a, mode, ports["new"]), port=port)
            new.start(ready_url=ready["new"])
        marks["new_ready"] = time.monotonic()
        time.sleep(a.after)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
        old.stop()
        if new is not None:
            new.stop()
    t0 = marks["sigterm"]
    counts = Counter(w for _, w in outcomes)
    errors = [(round(t - t0, 3), w) for t, w in outcomes if not w.isdigit()]
    lost = sum(counts[k] for k in LOST)
    row = {
        "mode": mode,
        "requests": len(outcomes),
        "outcomes": dict(counts),
        "ok": counts["200"],
        "status_503": counts["503"],
        "other_status": sum(
            v for k, v in counts.items() if k.isdigit() and k not in ("200", "503")
        ),
        "refused": counts["refused"],
        "lost": lost,
        "transport_errors": lost + counts["refused"],
        "old_exit_code": code,
        "old_exit_after_sigterm_s": round(marks["old_exit"] - t0, 3),
        "new_ready_after_sigterm_s": round(marks["new_ready"] - t0, 3),
        "first_errors": errors[:20],
    }
    print(
        f"{mode} delay {a.drain_delay:g}s: {row['requests']} requests, {row['ok']} ok, "
        f"{row['status_503']} x 503, {row['refused']} refused, {row['lost']} lost; old server "
        f"exited {row['old_exit_after_sigterm_s']:.2f} s after SIGTERM with {code}",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--mode", default="reuseport,after-exit",
        help="comma-separated: reuseport, after-exit (interleaved across repeats)",
    )  # fmt: skip
    p.add_argument("--model", default="tiny-resnet")
    p.add_argument("--images", default=str(HERE.parent.parent / "shared/data/images/medium"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--drain-delay", type=float, default=2.0, help="seconds (0: not passed)")
    p.add_argument("--before", type=float, default=4.0, help="seconds of load before the restart")
    p.add_argument("--after", type=float, default=3.0, help="seconds of load once it is over")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--label", default="", help="a name for this run in the table and JSON")
    p.add_argument("--out", default=str(HERE / "results" / "rolling_restart.json"))
    a = p.parse_args()

    modes = a.mode.split(",")
    if set(modes) - {"reuseport", "after-exit"}:
        p.error(f"--mode: reuseport and/or after-exit, not {a.mode!r}")
    store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    images = [f.read_bytes() for f in sorted(Path(a.images).glob("*.jpg"))]
    rows = []
    from _interleave import variant_order  # beside this script

    for rep in range(a.repeats):
        for mode in variant_order(modes, rep):
            rows.append(run_once(a, mode, images))

    title = f"rolling restart, {a.model}, c={a.concurrency}" + (f" ({a.label})" if a.label else "")
    table = Table(title=title)
    for col in ("mode", "drain delay s", "requests", "200", "503", "refused", "lost",
                "old exit s"):  # fmt: skip
        table.add_column(col, justify="right" if col != "mode" else "left")
    for r in sorted(rows, key=lambda r: r["mode"]):
        table.add_row(
            r["mode"], f"{a.drain_delay:g}", str(r["requests"]), str(r["ok"]),
            str(r["status_503"]), str(r["refused"]), str(r["lost"]),
            f"{r['old_exit_after_sigterm_s']:.2f}",
        )  # fmt: skip
    Console().print(table)
    summary = []
    for mode in modes:
        sel = [r for r in rows if r["mode"] == mode]
        summary.append({
            "mode": mode,
            "runs": len(sel),
            "lost_total": sum(r["lost"] for r in sel),
            "refused_total": sum(r["refused"] for r in sel),
            "status_503_total": sum(r["status_503"] for r in sel),
            "requests_median": statistics.median(r["requests"] for r in sel),
            "old_exit_after_sigterm_s_median": statistics.median(
                r["old_exit_after_sigterm_s"] for r in sel
            ),
        })  # fmt: skip
    out = write_benchmark(a.out, "rolling_restart", a, summary=summary, runs=rows)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

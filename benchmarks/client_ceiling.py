"""How many requests per second can the load generator drive from ONE core?

The client (``cvserve.bench.run_bench``, closed loop) is pinned to core 0 and a trivial
server to core 1, in another process, so the two never share a core. Two servers:

- ``raw``: an asyncio protocol answering every request with a canned predict response
  (JSON with ``batch_size``, a ``Server-Timing`` header from ``cvserve.trace``). It is
  several times cheaper per request than the client, so the client saturates first.
- ``fake``: ``cvserve.bench.fake`` (Starlette on uvicorn), the stand-in server of the
  tests. Usually the server saturates first: a lower bound on the client's ceiling.

The CPU time each process used while measuring tells which side was the bottleneck
(``client_cpu`` near 1.0: the client's core was saturated, the throughput is its
ceiling). On a shared machine neither may reach 1.0, so the client's CPU time per
request is reported too, and ``1 / that`` as the rate one free core could drive.

    python benchmarks/client_ceiling.py                    # both servers, 3 repeats, 5 s
    python benchmarks/client_ceiling.py --server raw --seconds 3 --repeat 1

Writes ``benchmarks/results/client_ceiling.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

CLIENT_CORE, SERVER_CORE = 0, 1


def _pin(core: int) -> bool:
    try:
        if core in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {core})
            return True
    except (AttributeError, OSError):
        pass
    return False


def _canned_response() -> bytes:
    from cvserve.trace import format_server_timing

    body = json.dumps(
        {
            "model": "echo",
            "task": "classify",
            "top_k": [{"label": "tabby", "score": 0.5}],
            "image_size": [1, 1],
            "batch_size": 1,
        }
    ).encode()
    timing = format_server_timing({"recv": 1e-5, "queue": 1e-6, "infer": 2e-6, "encode": 1e-6})
    head = (
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        f"server-timing: {timing}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _RawServer(asyncio.Protocol):
    """Answers each complete request (headers + Content-Length body) with one response."""

    response = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                break
            j = buf.lower().find(b"\r\ncontent-length:", 0, i)
            n = int(buf[j + 17 : buf.find(b"\r\n", j + 2)]) if j >= 0 else 0
            end = i + 4 + n
            if len(buf) < end:
                break
            self.transport.write(self.response)  # type: ignore[attr-defined]
            buf = buf[end:]
        self.buf = buf


def _serve(kind: str, sock: socket.socket) -> None:
    """Child process: serve on the inherited listening socket, pinned to SERVER_CORE."""
    _pin(SERVER_CORE)
    if kind == "raw":
        import uvloop

        async def main() -> None:
            _RawServer.response = _canned_response()
            loop = asyncio.get_running_loop()
            server = await loop.create_server(_RawServer, sock=sock)
            await server.serve_forever()

        uvloop.run(main())
    else:
        import uvicorn

        from cvserve.bench.fake import create_app

        config = uvicorn.Config(create_app(), log_level="warning", access_log=False)
        uvicorn.Server(config).run(sockets=[sock])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(url: str, server_pid: int, concurrency: int, seconds: float) -> dict:
    from cvserve.bench import BenchConfig, BenchImage, run_bench

    image = BenchImage("tiny.jpg", b"\xff\xd8\xff" + bytes(1024), "image/jpeg")
    config = BenchConfig(
        url=url,
        model="echo",
        images=[image],
        concurrency=[concurrency],
        warmup=1.0,
        duration=seconds,
        window=1.0,
        ready_timeout=30.0,
    )
    marks: list[tuple[float, float, float]] = []  # (wall, client cpu, server cpu)

    def at_windows(event: dict) -> None:
        # CPU over the measured windows only: not the probe, warm-up or summary
        if event["event"] == "window" or (event["event"] == "tick" and event["warming_up"]):
            mark = (time.perf_counter(), time.process_time(), _cpu_seconds(server_pid))
            if event["event"] == "window" or not marks:
                marks.append(mark)
            else:
                marks[0] = mark  # the last tick of the warm-up

    result = run_bench(config, progress=at_windows, command=sys.argv)
    (t0, c0, s0), (t1, c1, s1) = marks[0], marks[-1]
    point = result.points[0]
    return {
        "concurrency": concurrency,
        "throughput_rps": point.throughput_rps,
        "p50_ms": point.latency_ms["p50"],
        "errors": point.errors["total"],
        # share of one core each side used while measuring: which one was saturated
        "client_cpu": (c1 - c0) / (t1 - t0),
        "server_cpu": (s1 - s0) / (t1 - t0),
        # client CPU per measured request: robust to other load on a shared machine
        "client_us_per_request": 1e6 * (c1 - c0) / max(1.0, point.throughput_rps * (t1 - t0)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["raw", "fake", "both"], default="both")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "client_ceiling.json"
    )
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from cvserve.bench.results import write_benchmark

    console = Console()
    pinned = _pin(CLIENT_CORE)
    if not pinned or len(os.sched_getaffinity(0)) != 1 or (os.cpu_count() or 1) < 2:
        console.print("[yellow]warning: could not give client and server a core each[/]")
    servers = ["raw", "fake"] if args.server == "both" else [args.server]
    ctx = mp.get_context("spawn")
    runs = []
    for kind in servers:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        proc = ctx.Process(target=_serve, args=(kind, sock), daemon=True)
        proc.start()
        try:
            for rep in range(args.repeat):  # interleave concurrencies within each repeat
                for c in args.concurrency:
                    run = {
                        "server": kind,
                        "repeat": rep,
                        **_measure(url, proc.pid, c, args.seconds),
                    }
                    runs.append(run)
        finally:
            proc.terminate()
            proc.join(10)
            sock.close()

    table = Table(title="load generator ceiling (client on 1 core, server on another)")
    cols = ("server", "concurrency", "median req/s", "min", "max", "client cpu", "server cpu")
    for col in (*cols, "client µs/req", "req/s at 1 core"):
        table.add_column(col, justify="right")
    summary = []
    for kind in servers:
        for c in args.concurrency:
            sel = [r for r in runs if r["server"] == kind and r["concurrency"] == c]
            rps = [r["throughput_rps"] for r in sel]
            row = {
                "server": kind,
                "concurrency": c,
                "median_rps": statistics.median(rps),
                "min_rps": min(rps),
                "max_rps": max(rps),
                "client_cpu": statistics.median(r["client_cpu"] for r in sel),
                "server_cpu": statistics.median(r["server_cpu"] for r in sel),
                "client_us_per_request": statistics.median(r["client_us_per_request"] for r in sel),
                "errors": sum(r["errors"] for r in sel),
            }
            # what the client could drive if its core were all its own (CPU-bound)
            row["client_ceiling_rps"] = 1e6 / row["client_us_per_request"]
            summary.append(row)
            table.add_row(
                kind,
                str(c),
                f"{row['median_rps']:.0f}",
                f"{row['min_rps']:.0f}",
                f"{row['max_rps']:.0f}",
                f"{row['client_cpu']:.2f}",
                f"{row['server_cpu']:.2f}",
                f"{row['client_us_per_request']:.1f}",
                f"{row['client_ceiling_rps']:.0f}",
            )
    console.print(table)
    write_benchmark(
        args.out, "client_ceiling", args,
        pinned={"client_core": CLIENT_CORE, "server_core": SERVER_CORE, "ok": pinned},
        runs=runs, summary=summary,
    )  # fmt: skip
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What tracing costs the server: its CPU time per request with ``--trace-exporter otlp``
(every request a trace of its stages, sent to a collector) against ``none``.

Two servers of tiny-resnet on the simulated accelerator (the model's own time is a sleep,
so the CPU measured is the serving's: HTTP, decoding, the stages, and the spans) take
``--requests`` requests each from 4 clients, in interleaved repeats (the variants swap
order every repeat); the servers' CPU time (user + system, from /proc) over the window
divided by the requests is the cost of one. The OTLP collector is a stub in this process
that accepts every export, so the spans are really encoded and sent.

    python benchmarks/trace_cost.py
    python benchmarks/trace_cost.py --requests 400 --repeats 5

Linux only (/proc). Writes ``benchmarks/results/trace_cost.json``; prints each variant's
CPU ms per request (median [min-max] of the repeats) and the ratio otlp / none.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _interleave import median_range, variant_order

HERE = Path(__file__).resolve().parent
PHOTO = HERE.parent.parent / "shared" / "data" / "images" / "small" / "demo08.jpg"
SERVE = ["--model", "tiny-resnet", "--runtime", "simulated", "--sim-profile", "1:2",
         "--max-batch-size", "4", "--preprocess-threads", "2"]  # fmt: skip
VARIANTS = ("none", "otlp")


class _Collector(BaseHTTPRequestHandler):
    exports = 0

    def do_POST(self):  # noqa: N802 (the stdlib's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).exports += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, pid: int, body: bytes, n: int) -> float:
    """Server CPU ms per request over ``n`` requests from 4 clients."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one() -> None:
            r = await client.post("/v1/models/tiny-resnet:predict", content=body,
                                  headers={"traceparent": f"00-{os.urandom(16).hex()}-"
                                           f"{os.urandom(8).hex()}-01"})  # fmt: skip
            r.raise_for_status()

        await asyncio.gather(*(one() for _ in range(8)))  # warm
        c0 = _cpu_s(pid)
        for _ in range(n // 4):
            await asyncio.gather(*(one() for _ in range(4)))
        return 1000.0 * (_cpu_s(pid) - c0) / (n // 4 * 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--requests", type=int, default=300, help="per variant and repeat")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", type=Path, default=HERE / "results" / "trace_cost.json")
    a = p.parse_args(argv)

    from cvserve.bench.results import write_benchmark
    from cvserve.serving.process import ServerProcess

    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{collector.server_port}"
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # ms: exports happen within the window
    body = a.photo.read_bytes()
    servers = {v: ServerProcess([*SERVE, "--trace-exporter", v]) for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for s in servers.values():
            s.start()
        for rep in range(a.repeats):
            for v in variant_order(VARIANTS, rep):
                srv = servers[v]
                cpu[v].append(asyncio.run(_load(srv.url, srv.proc.pid, body, a.requests)))
        time.sleep(0.5)  # the last batch of spans
    finally:
        for s in servers.values():
            s.stop()
        collector.shutdown()
    ratios = [o / n for o, n in zip(cpu["otlp"], cpu["none"], strict=True)]
    for v in VARIANTS:
        print(f"--trace-exporter {v}: server CPU {median_range(cpu[v])} ms per request")
    print(f"otlp / none: {median_range(ratios)} (repeats interleaved; "
          f"{_Collector.exports} OTLP exports received)")  # fmt: skip
    summary = {"cpu_ms_per_request": {v: cpu[v] for v in VARIANTS},
               "median_cpu_ms_per_request": {v: statistics.median(cpu[v]) for v in VARIANTS},
               "ratio_otlp_over_none": ratios,
               "median_ratio": statistics.median(ratios),
               "otlp_exports_received": _Collector.exports}  # fmt: skip
    write_benchmark(a.out, "trace_cost", a, serve_args=SERVE, summary=summary)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one 429 costs the server: its CPU time per refused request, by body size.

A server with a slow simulated model and ``--max-queue 2`` is filled by two requests that
take 2 s each; then 16 concurrent clients post photos for ``--seconds`` and every one is
refused. The server's CPU time (user + system, from /proc) over that window divided by
the refusals is the cost of a refusal: reading the body, the edge, the error answer and
its log line. Under overload at 3x capacity, about two refusals are paid per request
served, on the cores the model needs (issue 12's goodput target).

    python benchmarks/refusal_cost.py
    python benchmarks/refusal_cost.py --photos ../shared/data/images/small/demo08.jpg

Linux only (/proc). Writes ``benchmarks/results/refusal_cost.json`` and prints a line per
photo.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEDIUM = HERE.parent.parent / "shared" / "data" / "images"
PHOTOS = (MEDIUM / "medium" / "demo01.jpg", MEDIUM / "small" / "demo08.jpg")
SERVE = ["--model", "tiny-resnet", "--runtime", "simulated", "--sim-profile", "1:2000",
         "--max-batch-size", "1", "--max-queue", "2"]  # fmt: skip


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _flood(url: str, pid: int, body: bytes, seconds: float) -> dict:
    import httpx

    post = {"url": "/v1/models/tiny-resnet:predict", "content": body,
            "headers": {"content-type": "image/jpeg"}}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        slow = [asyncio.create_task(client.post(**post)) for _ in range(2)]
        await asyncio.sleep(0.5)  # both admitted: the queue is full
        c0, t0 = _cpu_s(pid), time.perf_counter()
        statuses: dict[int, int] = {}
        while time.perf_counter() - t0 < seconds:
            for r in await asyncio.gather(*(client.post(**post) for _ in range(16))):
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        cpu = _cpu_s(pid) - c0
        await asyncio.gather(*slow)
    n = sum(statuses.values())
    return {"requests": n, "statuses": statuses, "server_cpu_s": cpu,
            "cpu_ms_per_request": 1000.0 * cpu / n}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", nargs="+", type=Path, default=list(PHOTOS))
    p.add_argument("--seconds", type=float, default=1.2, help="length of each flood (< 1.5)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "refusal_cost.json")
    a = p.parse_args(argv)

    from cvserve.bench.results import write_benchmark
    from cvserve.serving.process import ServerProcess

    rows = []
    with ServerProcess(SERVE) as srv:
        for photo in a.photos:
            body = photo.read_bytes()
            row = {"photo": photo.name, "body_bytes": len(body),
                   **asyncio.run(_flood(srv.url, srv.proc.pid, body, a.seconds))}  # fmt: skip
            rows.append(row)
            print(f"{photo.name} ({len(body) / 1024:.0f} KB): {row['requests']} requests "
                  f"{row['statuses']}, server CPU {row['cpu_ms_per_request']:.2f} ms each")  # fmt: skip
    write_benchmark(a.out, "refusal_cost", a, serve_args=SERVE, rows=rows)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzz a running server's decoding front: ``--images`` mutated files (default 100,000),
each one different, from the shared data set's bad files and photos, sent by
``--concurrency`` clients. Counts what must stay zero: 5xx answers, crashes (the server
stops answering or exits) and hangs (no answer within ``--timeout``); and reports the
server's RSS at the start and the end.

By default it starts ``cvserve serve --model resnet18`` on the simulated accelerator (the
decoding front is what is fuzzed; a 1 ms "DNN" keeps the run short); ``--url`` and
``--pid`` fuzz a server that is already running instead. The first 5xx/hang inputs are
kept under ``--keep`` for replay.

    python benchmarks/fuzz.py                    # 100,000 images, ~5-10 minutes here
    python benchmarks/fuzz.py --quick            # 3,000 images
    python benchmarks/fuzz.py --url http://127.0.0.1:8000 --model resnet18 --pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
SERVE_DEFAULT = "--runtime simulated --sim-profile 1:1,8:2"
#: What a request may be answered with; anything else (5xx) is a finding.
EXPECTED = {200, 400, 413, 415, 429}


def seeds() -> dict[str, bytes]:
    files = [p for p in sorted((DATA / "bad").iterdir()) if p.is_file()]
    files += sorted((DATA / "images" / "small").glob("*.jpg"))
    files += sorted((DATA / "images" / "medium").glob("*.jpg"))[:2]
    return {p.name: p.read_bytes() for p in files}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four edits: bit flips, byte sets, size fields pushed up or zeroed, a cut tail,
    inserted junk, a deleted run; half of them inside the first 512 bytes (the header)."""
    d = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(d)
        if n == 0:
            d += rng.randbytes(rng.randint(1, 64))
            continue
        pos = rng.randrange(min(n, 512)) if rng.random() < 0.5 else rng.randrange(n)
        op = rng.randrange(6)
        if op == 0:
            d[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            d[pos] = rng.randrange(256)
        elif op == 2:
            d[pos : pos + 2] = rng.choice((b"\xff\xff", b"\x7f\xff", b"\x00\x00"))
        elif op == 3:
            del d[pos:]
        elif op == 4:
            d[pos:pos] = rng.randbytes(rng.randint(1, 64))
        else:
            del d[pos : pos + rng.randint(1, 256)]
    return bytes(d)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


async def fuzz(url: str, model: str, a, keep: Path) -> dict:
    corpus = seeds()
    names = sorted(corpus)
    statuses: Counter[int] = Counter()
    findings: list[dict] = []
    latencies: list[float] = []
    hangs = connection_errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=a.concurrency, max_keepalive_connections=a.concurrency)
    progress_at = time.monotonic()

    async with httpx.AsyncClient(base_url=url, timeout=a.timeout, limits=limits) as client:

        async def worker(w: int) -> None:
            nonlocal sent, hangs, connection_errors, progress_at
            rng = random.Random(a.seed * 1_000_003 + w)
            while sent < a.images and connection_errors < 20:
                sent += 1
                seed = rng.choice(names)
                body = mutate(corpus[seed], rng)
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"/v1/models/{model}:predict", content=body,
                                          headers={"content-type": "application/octet-stream"})  # fmt: skip
                    status = r.status_code
                except httpx.TimeoutException:
                    status, hangs = -1, hangs + 1
                except httpx.TransportError:
                    status, connection_errors = -2, connection_errors + 1
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
                if status not in EXPECTED and len(findings) < 50:
                    keep.mkdir(parents=True, exist_ok=True)
                    path = keep / f"{len(findings):02d}-{status}-{seed}"
                    path.write_bytes(body)
                    detail = r.text[:300] if status > 0 else ""
                    findings.append({"status": status, "seed": seed, "file": str(path),
                                     "body": detail})  # fmt: skip
                if time.monotonic() - progress_at > 10 and w == 0:
                    progress_at = time.monotonic()
                    print(f"  {sent} sent: {dict(statuses)}", file=sys.stderr, flush=True)

        t0 = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(a.concurrency)))
        seconds = time.monotonic() - t0
        try:
            ready = (await client.get("/readyz", timeout=10)).status_code == 200
        except httpx.HTTPError:
            ready = False
    lat = np.array(latencies) * 1000.0
    return {
        "images": sum(statuses.values()),
        "seconds": seconds,
        "by_status": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "hangs": hangs,
        "connection_errors": connection_errors,
        "ready_after": ready,
        "latency_ms": {
            k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p99", 99), ("max", 100))
        }
        if lat.size
        else {},
        "findings": findings,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a hang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--serve-args", default=SERVE_DEFAULT, help="flags of the server started")
    p.add_argument("--url", default=None, help="fuzz this running server instead")
    p.add_argument("--pid", type=int, default=None, help="its process id (for RSS)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--keep", default=str(HERE / "results" / "fuzz-findings"))
    p.add_argument("--quick", action="store_true", help="3,000 images")
    p.add_argument("--out", default=str(HERE / "results" / "fuzz.json"))
    a = p.parse_args()
    if a.quick:
        a.images = 3_000
    keep = Path(a.keep)

    srv = None
    url, pid = a.url, a.pid
    if url is None:
        store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
        args = ["--model", a.model, *shlex.split(a.serve_args)]
        if a.cache_dir:
            args += ["--cache-dir", a.cache_dir]
        srv = ServerProcess(args, port=free_port()).start()
        url, pid = srv.url, srv.proc.pid if srv.proc else None
    try:
        rss_start = rss_mb(pid)
        res = asyncio.run(fuzz(url, a.model, a, keep))
        rss_end = rss_mb(pid)
        exited = srv is not None and srv.proc is not None and srv.proc.poll() is not None
    finally:
        code = srv.stop() if srv is not None else None
    crashed = exited or not res["ready_after"] or res["connection_errors"] > 0
    res.update(rss_start_mb=rss_start, rss_end_mb=rss_end, crashed=crashed, exit_code=code)
    ok = not crashed and res["server_errors"] == 0 and res["hangs"] == 0

    table = Table(title=f"fuzz: {res['images']} mutated images, c={a.concurrency}")
    for col in ("images", "img/s", "5xx", "crashes", "hangs", "answers", "p99 ms", "RSS start",
                "RSS end"):  # fmt: skip
        table.add_column(col, justify="right")
    mb = lambda v: "-" if v is None else f"{v:.0f} MB"  # noqa: E731
    table.add_row(
        str(res["images"]), f"{res['images'] / max(res['seconds'], 1e-9):.0f}",
        str(res["server_errors"]), str(int(crashed)), str(res["hangs"]),
        " ".join(f"{k}:{v}" for k, v in res["by_status"].items()),
        f"{res['latency_ms'].get('p99', 0):.1f}", mb(rss_start), mb(rss_end),
    )  # fmt: skip
    Console(width=200).print(table)
    for f in res["findings"][:10]:
        print(f"finding: {f['status']} from a mutated {f['seed']} ({f['file']}): {f['body']}",
              file=sys.stderr)  # fmt: skip
    out = write_benchmark(a.out, "fuzz", a, result=res, goal_met=ok)
    print(f"wrote {out}; goal (no 5xx, crash or hang): {'met' if ok else 'NOT met'}",
          file=sys.stderr)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

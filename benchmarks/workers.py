"""One server process with threads vs ``--workers N`` processes on one port (SO_REUSEPORT).

For each repeat and variant (in turn, the order alternating across repeats, so that A and
B are interleaved): start ``cvserve serve --model MODEL`` with the variant's flags in its
own process, wait until every worker is ready, and run cvserve's own closed-loop bench
(one keep-alive connection per client) at each ``--concurrency`` on the same images.
Reports throughput, p50 and p99 (median over repeats, [min-max]), each variant's
throughput ratio to the first variant (one process) measured in the same repeat, and the
requests that got no 200 (429s under overload included).

    python benchmarks/workers.py                    # resnet18, c=1 and 16, 3 repeats (~6 min)
    python benchmarks/workers.py --quick            # one short repeat (development)
    python benchmarks/workers.py --workers 4 --variant '4 workers=--workers 4'

The kernel spreads connections, not requests: at c=1 the one connection lands on one
process, so ``--workers`` can only pay at higher concurrency.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cvserve.bench import BenchConfig, run_bench
from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def _variants(a: argparse.Namespace) -> dict[str, str]:
    if a.variant:
        return dict(v.partition("=")[::2] for v in a.variant)
    n = a.workers
    return {
        "1 process": "",
        f"{n} workers": f"--workers {n}",
        f"{n} workers, 1 thread": f"--workers {n} --intra-op-threads 1",
    }


def measure(url: str, a: argparse.Namespace, conc: list[int]) -> list[dict]:
    res = run_bench(BenchConfig(
        url=url, model=a.model, images=a.images, concurrency=conc,
        duration=a.duration, warmup=a.warmup, timeout=a.timeout,
    ))  # fmt: skip
    return [
        {"concurrency": p.concurrency, "throughput_rps": p.throughput_rps,
         "p50_ms": p.latency_ms["p50"], "p99_ms": p.latency_ms["p99"],
         "requests": p.requests, "errors": p.errors["total"]}
        for p in res.points
    ]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", default=str(DATA / "images" / "medium"))
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per point")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout (s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="N of the default variants")
    p.add_argument(
        "--variant", action="append", default=None,
        help="NAME=SERVE_ARGS (repeatable; the first is the baseline); default: one "
        "process, --workers N, --workers N --intra-op-threads 1",
    )  # fmt: skip
    p.add_argument("--serve-args", default="", help="`cvserve serve` flags of every variant")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true", help="one short repeat (development)")
    p.add_argument("--out", default=str(HERE / "results" / "workers.json"))
    a = p.parse_args()
    if a.quick:
        a.duration, a.warmup, a.repeats = 4.0, 1.0, 1

    variants = _variants(a)
    base = next(iter(variants))
    conc = [int(c) for c in a.concurrency.split(",")]
    store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    runs = []
    from _interleave import median_range, variant_order  # beside this script

    for rep in range(a.repeats):
        order = variant_order(variants, rep)
        for name in order:
            args = ["--model", a.model, *shlex.split(a.serve_args), *shlex.split(variants[name])]
            if a.cache_dir:
                args += ["--cache-dir", a.cache_dir]
            with ServerProcess(args, port=free_port()) as srv:
                points = measure(srv.url, a, conc)
            for pt in points:
                runs.append({"repeat": rep, "variant": name, "serve_args": variants[name], **pt})
                print(
                    f"rep {rep} {name} c={pt['concurrency']}: {pt['throughput_rps']:.1f}/s, "
                    f"p50 {pt['p50_ms']:.1f} ms, p99 {pt['p99_ms']:.1f} ms, "
                    f"errors {pt['errors']}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip

    def find(rep: int, name: str, c: int) -> dict | None:
        return next((r for r in runs if (r["repeat"], r["variant"], r["concurrency"])
                     == (rep, name, c)), None)  # fmt: skip

    table = Table(title=f"{a.model}, {Path(a.images).name} images, {os.cpu_count()} cores: "
                  "median over repeats [min-max]")  # fmt: skip
    cols = ("variant", "c", "throughput/s", "p50 ms", "p99 ms", f"ratio vs {base}", "errors")
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    summary = []
    for c in conc:
        for name in variants:
            sel = [r for r in runs if r["variant"] == name and r["concurrency"] == c]
            ratios = []
            for r in sel:
                b = find(r["repeat"], base, c)
                if b and b["throughput_rps"]:
                    ratios.append(r["throughput_rps"] / b["throughput_rps"])
            s = {
                "variant": name, "serve_args": variants[name], "concurrency": c,
                "throughput_rps": [r["throughput_rps"] for r in sel],
                "p50_ms": [r["p50_ms"] for r in sel], "p99_ms": [r["p99_ms"] for r in sel],
                "throughput_ratio": ratios, "errors": [r["errors"] for r in sel],
            }  # fmt: skip
            summary.append(s)
            table.add_row(name, str(c), *(median_range(s[k]) for k in (
                "throughput_rps", "p50_ms", "p99_ms", "throughput_ratio", "errors")))  # fmt: skip
    Console(width=200).print(table)
    out = write_benchmark(a.out, "workers", a, variants=variants, summary=summary, runs=runs)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

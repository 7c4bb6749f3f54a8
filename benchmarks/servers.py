"""cvserve against the server most people write first, side by side on the same images.

For each model and repeat, every server variant is started in its own process (in turn,
interleaved across repeats), loaded by `cvserve bench` at each concurrency, and stopped.
Prints medians with their spread, and the ratio to the baseline measured in the same
repeat; writes everything to JSON.

    python benchmarks/servers.py --models resnet18,resnet50 --concurrency 1,16 --repeats 3
    python benchmarks/servers.py --variant 'cvserve-2x1=--instances 2 --intra-op-threads 1'
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cvserve.bench import BenchConfig, run_bench
from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port
from cvserve.study.baseline import BaselineProcess

HERE = Path(__file__).resolve().parent


def start(variant: str, serve_args: str, model: str, cache: str | None) -> ServerProcess:
    if variant == "baseline":
        meta = store.ensure_built(model, cache)
        return BaselineProcess(store.model_path(meta, cache), model)
    args = ["--model", model, *shlex.split(serve_args)]
    if cache:
        args += ["--cache-dir", cache]
    return ServerProcess(args, port=free_port())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--images", default=str(HERE.parent.parent / "shared/data/images/medium"))
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--variant", action="append", default=None,
        help="NAME=SERVE_ARGS: a cvserve configuration to compare (repeatable); "
        "default: cvserve with its defaults",
    )  # fmt: skip
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument(
        "--no-retry-after", action="store_true",
        help="after a 429, send the next request at once (as perf_analyzer, hey and locust "
        "do), not after its Retry-After",
    )  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results" / "servers.json"))
    a = p.parse_args()

    variants = {} if a.no_baseline else {"baseline": ""}
    for v in a.variant or ["cvserve="]:
        name, _, args = v.partition("=")
        variants[name] = args
    models = a.models.split(",")
    conc = [int(c) for c in a.concurrency.split(",")]
    for m in models:
        store.ensure_built(m, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))

    rows = []
    from _interleave import variant_order  # beside this script

    for rep in range(a.repeats):
        for model in models:
            order = variant_order(variants, rep)
            for variant in order:
                srv = start(variant, variants[variant], model, a.cache_dir)
                with srv:
                    res = run_bench(BenchConfig(
                        url=srv.url, model=model, images=a.images, concurrency=conc,
                        duration=a.duration, warmup=a.warmup,
                        honor_retry_after=not a.no_retry_after,
                    ))  # fmt: skip
                for pt in res.points:
                    row = {
                        "repeat": rep, "model": model, "variant": variant,
                        "serve_args": variants[variant], "concurrency": pt.concurrency,
                        "throughput_rps": pt.throughput_rps, "latency_ms": pt.latency_ms,
                        "errors": pt.errors["total"], "mean_batch_size": pt.mean_batch_size,
                        "breakdown_ms": pt.breakdown_ms, "breakdown_pct": pt.breakdown_pct,
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"rep {rep} {model:10s} {variant:14s} c={pt.concurrency:<3d} "
                        f"{pt.throughput_rps:6.1f} req/s  p50 {pt.latency_ms['p50']:7.1f} ms  "
                        f"p99 {pt.latency_ms['p99']:7.1f} ms  batch {pt.mean_batch_size or 0:.2f}  "
                        f"errors {pt.errors['total']}",
                        file=sys.stderr,
                        flush=True,
                    )

    table = Table(title="servers side by side (median over repeats [min-max]; ratio to baseline)")
    for col in (
        "model",
        "server",
        "c",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x baseline",
        "batch",
        "errors",
    ):
        table.add_column(col, justify="right" if col not in ("model", "server") else "left")
    summary = []
    for model in models:
        for c in conc:
            for variant in variants:
                sel = [
                    r
                    for r in rows
                    if (r["model"], r["variant"], r["concurrency"]) == (model, variant, c)
                ]
                tput = [r["throughput_rps"] for r in sel]
                p50 = [r["latency_ms"]["p50"] for r in sel]
                p99 = [r["latency_ms"]["p99"] for r in sel]
                ratios = []
                for r in sel:
                    base = [b for b in rows if (b["model"], b["variant"], b["concurrency"], b["repeat"])
                            == (model, "baseline", c, r["repeat"])]  # fmt: skip
                    if base and base[0]["throughput_rps"]:
                        ratios.append(r["throughput_rps"] / base[0]["throughput_rps"])
                s = {
                    "model": model, "variant": variant, "concurrency": c,
                    "throughput_rps_median": statistics.median(tput),
                    "throughput_rps_range": [min(tput), max(tput)],
                    "p50_ms_median": statistics.median(p50), "p99_ms_median": statistics.median(p99),
                    "ratio_to_baseline_median": statistics.median(ratios) if ratios else None,
                    "ratio_to_baseline_range": [min(ratios), max(ratios)] if ratios else None,
                    "errors": [r["errors"] for r in sel],
                }  # fmt: skip
                summary.append(s)
                table.add_row(
                    model, variant, str(c),
                    f"{s['throughput_rps_median']:.1f} [{min(tput):.1f}-{max(tput):.1f}]",
                    f"{s['p50_ms_median']:.1f}", f"{s['p99_ms_median']:.1f}",
                    "-" if variant == "baseline" or not ratios
                    else f"{s['ratio_to_baseline_median']:.2f} [{min(ratios):.2f}-{max(ratios):.2f}]",
                    f"{statistics.median([r['mean_batch_size'] or 0 for r in sel]):.2f}",
                    ",".join(str(r["errors"]) for r in sel),
                )  # fmt: skip
    Console().print(table)
    out = write_benchmark(a.out, "servers", a, variants=variants, summary=summary, runs=rows)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

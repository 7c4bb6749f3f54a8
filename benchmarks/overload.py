"""Admission under overload: what accepted requests, refused ones and the server's goodput
look like when Poisson arrivals come at 3x what the server can do.

For each repeat and server variant (in turn, interleaved across repeats): start
``cvserve serve --model MODEL`` in its own process; measure its capacity with closed-loop
load (the best throughput over ``--concurrency``, and the p99 latency at the smallest
concurrency that reaches 95% of it); then offer Poisson arrivals at ``--factor`` x that
capacity for ``--duration`` seconds. Reports accepted p99 / p99 at capacity, goodput
(answers 200 per second) / capacity, and the latency of the 429 answers.

    python benchmarks/overload.py                          # resnet18, 60 s at 3x, 3 repeats
    python benchmarks/overload.py --quick                  # ~1 minute, for development
    python benchmarks/overload.py --variant 'count-only=--max-queue-wait-ms 0' \\
        --variant 'default='                               # before/after, interleaved
    python benchmarks/overload.py --serve-args '--runtime simulated --sim-profile 1:20,8:250'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cvserve.bench import BenchConfig, run_bench
from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
#: Goals of issue 20 (issue 12 asked 0.95 goodput; 20 asks 0.93 with the server on its
#: own core), with default settings.
GOALS = {"p99_ratio_max": 2.0, "goodput_ratio_min": 0.93, "refused_p99_ms_max": 10.0}


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q) * 1000.0) if values.size else None


def capacity(url: str, model: str, images: str, conc: list[int], a) -> dict:
    """Closed-loop sweep: the best throughput, and p99 where it is first (nearly) reached."""
    res = run_bench(BenchConfig(
        url=url, model=model, images=images, concurrency=conc,
        duration=a.capacity_duration, warmup=a.capacity_warmup,
    ))  # fmt: skip
    points = [
        {"concurrency": p.concurrency, "throughput_rps": p.throughput_rps,
         "p50_ms": p.latency_ms["p50"], "p99_ms": p.latency_ms["p99"], "errors": p.errors["total"]}
        for p in res.points
    ]  # fmt: skip
    best = max(p["throughput_rps"] for p in points)
    at = min((p for p in points if p["throughput_rps"] >= 0.95 * best),
             key=lambda p: p["concurrency"])  # fmt: skip
    return {"capacity_rps": best, "p99_ms": at["p99_ms"], "p50_ms": at["p50_ms"],
            "concurrency": at["concurrency"], "points": points}  # fmt: skip


class AdmissionPoller(threading.Thread):
    """The model's admission state (``GET /v1/models/NAME``) once a second: what the
    server estimated (service rate, wait limit, expected wait) and how much it held."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/v1/models/{model}"
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    self.samples.append(json.load(r).get("admission") or {})
            except (OSError, ValueError):
                pass

    def medians(self) -> dict:
        out = {}
        for key in ("service_rate_per_s", "wait_limit_ms", "expected_wait_ms", "inflight"):
            vals = [s[key] for s in self.samples if isinstance(s.get(key), int | float)]
            out[key] = statistics.median(vals) if vals else None
        # the share of samples in which the server counted its queue as growing (the
        # automatic wait limit applies only then)
        growing = [bool(s["queue_growing"]) for s in self.samples if "queue_growing" in s]
        out["growing_share"] = round(sum(growing) / len(growing), 2) if growing else None
        return out


def overload(url: str, model: str, images: str, rate: float, a) -> dict:
    """Poisson arrivals at ``rate`` per second: what each kind of answer looked like."""
    poller = AdmissionPoller(url, model)
    poller.start()
    # auto: long enough for the onset (the queue fills to max_queue, 64 by default, then
    # drains to the wait limit) at this capacity
    capacity = rate / a.factor
    onset = 64 / max(rate - capacity, 1e-9) + 64 / capacity  # fill, then drain
    warmup = a.warmup if a.warmup is not None else max(3.0, onset + 1.0)
    res = run_bench(BenchConfig(
        url=url, model=model, images=images, rates=[rate], duration=a.duration,
        warmup=warmup, timeout=a.timeout,
    ))  # fmt: skip
    poller.stop.set()
    pt = res.points[0]
    rows = res.rows
    m = rows["measured"]
    status, lat = rows["status"], rows["latency"]
    ok, refused = m & (status == 200), m & (status == 429)
    onset = ~m & (status == 200)  # accepted during the warm-up: the overload's onset
    return {
        "offered_rps": pt.offered_rps,
        "goodput_rps": pt.throughput_rps,
        "requests": int(m.sum()),
        "accepted": int(ok.sum()),
        "refused": int(refused.sum()),
        "by_status": pt.errors["by_status"],
        "by_kind": pt.errors["by_kind"],
        "accepted_ms": {
            "p50": _pct(lat[ok], 50),
            "p99": _pct(lat[ok], 99),
            "max": _pct(lat[ok], 100),
        },  # fmt: skip
        "refused_ms": {"p50": _pct(lat[refused], 50), "p99": _pct(lat[refused], 99)},
        # the queue fills to max_queue before the server counts it as growing (a closed
        # loop that deep is no overload); then it drains to the wait limit: the warm-up
        # must cover that, ~max_queue / ((factor - 1) x capacity) + max_queue / capacity
        "onset_accepted_ms": {
            "p99": _pct(lat[onset], 99),
            "max": _pct(lat[onset], 100),
            "count": int(onset.sum()),
            "warmup_s": warmup,
        },  # fmt: skip
        "dropped": pt.dropped,
        "send_lag_ms": pt.send_lag_ms,
        "mean_batch_size": pt.mean_batch_size,
        "admission_median": poller.medians(),
        # where an accepted request's time went (mean ms; network: outside the server)
        "breakdown_ms": pt.breakdown_ms,
    }


def main() -> int:
    from _interleave import median_range, variant_order  # beside this script

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", default=str(DATA / "images" / "medium"))
    p.add_argument("--concurrency", default="4,8,16", help="closed-loop sweep for capacity")
    p.add_argument("--capacity-duration", type=float, default=15.0)
    p.add_argument("--factor", type=float, default=3.0, help="offered load / capacity")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of overload")
    p.add_argument("--capacity-warmup", type=float, default=3.0)
    p.add_argument(
        "--warmup", type=float, default=None,
        help="seconds of overload before measuring (default: the onset, max(3, 1 + 64 / "
        "(rate - capacity) + 64 / capacity): the queue fills to max_queue, then drains)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout (s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--variant", action="append", default=None,
        help="NAME=SERVE_ARGS: extra `cvserve serve` flags of one server variant (repeatable; "
        "default: one variant with cvserve's defaults)",
    )  # fmt: skip
    p.add_argument("--serve-args", default="", help="`cvserve serve` flags of every variant")
    p.add_argument(
        "--server-cpus", default=None, metavar="0,1",
        help="pin the server to these CPUs and this script (the load generator) to the "
        "others (Linux), so that the client's work does not take the server's cores",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="one short repeat (development)")
    p.add_argument("--out", default=str(HERE / "results" / "overload.json"))
    a = p.parse_args()
    if a.quick:
        a.concurrency, a.capacity_duration, a.duration, a.capacity_warmup, a.repeats = (
            "8", 6.0, 15.0, 2.0, 1)  # fmt: skip

    server_cpus = None
    if a.server_cpus:
        server_cpus = {int(c) for c in a.server_cpus.split(",")}
        client_cpus = os.sched_getaffinity(0) - server_cpus
        if not client_cpus:
            p.error(f"--server-cpus {a.server_cpus} leaves no CPU for the load generator")
        os.sched_setaffinity(0, client_cpus)  # before the bench starts its threads
    variants = dict(v.partition("=")[::2] for v in a.variant or ["default="])
    conc = [int(c) for c in a.concurrency.split(",")]
    store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    runs = []
    for rep in range(a.repeats):
        for name in variant_order(variants, rep):
            args = ["--model", a.model, *shlex.split(a.serve_args), *shlex.split(variants[name])]
            if a.cache_dir:
                args += ["--cache-dir", a.cache_dir]
            with ServerProcess(args, port=free_port(), cpus=server_cpus) as srv:
                cap = capacity(srv.url, a.model, a.images, conc, a)
                over = overload(srv.url, a.model, a.images, a.factor * cap["capacity_rps"], a)
            run = {"repeat": rep, "variant": name, "serve_args": variants[name],
                   "capacity": cap, "overload": over}  # fmt: skip
            acc = over["accepted_ms"]["p99"]
            run["p99_ratio"] = acc / cap["p99_ms"] if acc and cap["p99_ms"] else None
            run["goodput_ratio"] = over["goodput_rps"] / cap["capacity_rps"]
            runs.append(run)
            print(
                f"rep {rep} {name}: capacity {cap['capacity_rps']:.1f}/s (p99 {cap['p99_ms']:.0f} "
                f"ms at c={cap['concurrency']}); at {over['offered_rps']:.1f}/s offered: goodput "
                f"{over['goodput_rps']:.1f}/s, accepted p99 {acc or float('nan'):.0f} ms, "
                f"429 p99 {over['refused_ms']['p99'] or float('nan'):.1f} ms, onset (warm-up "
                f"{over['onset_accepted_ms']['warmup_s']:.1f} s) accepted p99 "
                f"{over['onset_accepted_ms']['p99'] or float('nan'):.0f} ms, "
                f"statuses {over['by_status']}; server: {over['admission_median']}",
                file=sys.stderr, flush=True,
            )  # fmt: skip

    table = Table(title=f"{a.model} at {a.factor:g}x capacity, Poisson (median over repeats "
                  "[min-max])")  # fmt: skip
    cols = (
        "variant",
        "capacity/s",
        "p99 at cap ms",
        "goodput/s",
        "goodput/cap",
        "accepted p99 ms",
        "p99/p99 cap",
        "429 p50 ms",
        "429 p99 ms",
        "refused",
        "5xx+504",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")

    summary = []
    for name in variants:
        sel = [r for r in runs if r["variant"] == name]
        s = {
            "variant": name,
            "capacity_rps": [r["capacity"]["capacity_rps"] for r in sel],
            "p99_at_capacity_ms": [r["capacity"]["p99_ms"] for r in sel],
            "goodput_rps": [r["overload"]["goodput_rps"] for r in sel],
            "goodput_ratio": [r["goodput_ratio"] for r in sel],
            "accepted_p99_ms": [r["overload"]["accepted_ms"]["p99"] for r in sel],
            "p99_ratio": [r["p99_ratio"] for r in sel],
            "refused_p50_ms": [r["overload"]["refused_ms"]["p50"] for r in sel],
            "refused_p99_ms": [r["overload"]["refused_ms"]["p99"] for r in sel],
            "refused_share": [
                r["overload"]["refused"] / max(1, r["overload"]["requests"]) for r in sel
            ],  # fmt: skip
            "server_errors": [
                sum(c for s_, c in r["overload"]["by_status"].items() if s_.startswith("5"))
                for r in sel
            ],  # fmt: skip
        }
        summary.append(s)
        table.add_row(name, *(median_range(s[k]) for k in (
            "capacity_rps", "p99_at_capacity_ms", "goodput_rps", "goodput_ratio",
            "accepted_p99_ms", "p99_ratio", "refused_p50_ms", "refused_p99_ms",
            "refused_share", "server_errors")))  # fmt: skip
    Console(width=200).print(table)
    print(f"goals (issue 20): p99/p99 cap <= {GOALS['p99_ratio_max']}, goodput/cap >= "
          f"{GOALS['goodput_ratio_min']}, 429 p99 < {GOALS['refused_p99_ms_max']} ms", file=sys.stderr)  # fmt: skip
    out = write_benchmark(a.out, "overload", a, variants=variants, goals=GOALS, summary=summary,
                          runs=runs)  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

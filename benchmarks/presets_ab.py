"""The ``ocr`` and ``detect-classify`` presets against the hard-coded kinds they replace:
the same config served by two copies of cvserve (``--before``: a tree of the code before
the change, e.g. ``git archive a18af83 src | tar -x -C /tmp/before``; after: this tree),
interleaved (their order alternating from repeat to repeat), each loaded by
``cvserve bench`` at each concurrency. Reported per pipeline and concurrency: median
throughput and p50 of each, and the after/before ratio of each repeat.

    python benchmarks/presets_ab.py --before /tmp/before/src --duration 6 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _interleave import median_range, variant_order  # noqa: E402
from brokers import PIPELINES, serve_config  # noqa: E402

from cvserve.bench import BenchConfig, run_bench  # noqa: E402
from cvserve.machine import machine_info  # noqa: E402
from cvserve.serving.process import ServerProcess  # noqa: E402

AFTER = str(HERE.parent / "src")


def point(src: str, name: str, spec: dict, conc: list[int], a, tmp: str) -> list[dict]:
    cfg = serve_config(Path(tmp) / f"{name}.yaml", name, spec["kind"], "inprocess://",
                       spec["params"], a.cache_dir)  # fmt: skip
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = src  # the server's copy of cvserve
    try:
        with ServerProcess(["--config", str(cfg)]) as srv:
            cpu0, n0 = _cpu_s(srv.proc.pid), _answered(srv.url, name)
            res = run_bench(BenchConfig(
                url=srv.url, model=name, kind="pipeline", images=str(spec["images"]),
                concurrency=conc, duration=a.duration, warmup=a.warmup,
            ))  # fmt: skip
            cpu1, n1 = _cpu_s(srv.proc.pid), _answered(srv.url, name)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    # server CPU seconds per answered request over the whole run (every concurrency):
    # what a busy machine changes least
    cpu = (cpu1 - cpu0) / (n1 - n0) if n1 > n0 else None
    return [{"concurrency": p.concurrency, "throughput_rps": p.throughput_rps,
             "p50_ms": p.latency_ms["p50"], "errors": p.errors["total"],
             "server_cpu_s_per_request": cpu} for p in res.points]  # fmt: skip


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answered(url: str, name: str) -> int:
    import re
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    pat = rf'cvserve_requests_total{{model="{re.escape(name)}",status="(\d+)"}} ([0-9.e+]+)'
    return int(sum(float(v) for _, v in re.findall(pat, text)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the src/ folder of the code before")
    p.add_argument("--pipelines", default="ocr,detect-classify")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(HERE / "results" / "presets_ab.json"))
    a = p.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for name in a.pipelines.split(","):
                for variant in variant_order(["before", "after"], rep):
                    src = a.before if variant == "before" else AFTER
                    for r in point(src, name, PIPELINES[name], conc, a, tmp):
                        rows.append({"repeat": rep, "pipeline": name, "variant": variant, **r})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = []
    for name in a.pipelines.split(","):
        for c in conc:

            def of(v, key, name=name, c=c):
                return [r[key] for r in rows if (r["pipeline"], r["variant"],
                                                 r["concurrency"]) == (name, v, c)]  # fmt: skip

            ratios = [x / y for x, y in zip(of("after", "throughput_rps"),
                                            of("before", "throughput_rps"), strict=True) if y]  # fmt: skip
            summary.append({
                "pipeline": name, "concurrency": c,
                "before_rps": median_range(of("before", "throughput_rps")),
                "after_rps": median_range(of("after", "throughput_rps")),
                "before_p50_ms": median_range(of("before", "p50_ms")),
                "after_p50_ms": median_range(of("after", "p50_ms")),
                "after_over_before": median_range(ratios),
                "before_cpu_s_per_request": median_range(of("before", "server_cpu_s_per_request")),
                "after_cpu_s_per_request": median_range(of("after", "server_cpu_s_per_request")),
                "ratio_median": statistics.median(ratios) if ratios else None,
            })  # fmt: skip
            s = summary[-1]
            print(
                f"{name:16s} c={c}  before {s['before_rps']:>18} req/s  after "
                f"{s['after_rps']:>18} req/s  after/before {s['after_over_before']}"
            )
    Path(a.out).write_text(json.dumps({
        "benchmark": "presets_ab", "config": vars(a), "machine": machine_info(),
        "note": "busy shared machine (2 cores, other helpers' tests running)",
        "rows": rows, "summary": summary}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

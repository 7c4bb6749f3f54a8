"""The torch runtime against onnxruntime on this CPU: the same model (its ONNX file and its
``.pt2``, ``cvserve models build NAME --pt2``), the same photos, the same server settings,
closed loop at each concurrency. Both servers run at once, each in its own process, idle
while the other is loaded; the two are measured in turn, their order alternating per
repeat (``benchmarks/_interleave.py``), so both see the same (busy) machine.

    python benchmarks/torch_vs_ort.py                    # resnet50, medium, c=1,16, 3 repeats
    python benchmarks/torch_vs_ort.py --quick            # 1 repeat, short points
    python benchmarks/torch_vs_ort.py --cache DIR --model resnet50 --duration 10

Reported per concurrency and runtime: req/s, p50 ms and the server's CPU ms per image as
median [min-max] over the repeats, and torch / onnxruntime of each (median of the
per-repeat ratios). Writes ``benchmarks/results/torch_vs_ort.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from _interleave import median_range, variant_order
from gpu_check import _cpu_s

from cvserve.bench import BenchConfig, run_bench
from cvserve.bench.results import write_benchmark
from cvserve.models.pt2 import ensure_pt2
from cvserve.serving.process import ServerProcess

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("CVSERVE_DATA") or HERE.parent.parent / "shared" / "data")
RUNTIMES = ("onnxruntime", "torch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--cache", default=None, help="model store (default: $CVSERVE_CACHE)")
    p.add_argument("--images", default=str(DATA / "images" / "medium"))
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="1 repeat of 3 s points")
    p.add_argument("--out", default=str(HERE / "results" / "torch_vs_ort.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.duration, a.warmup = 1, 3.0, 1.0
    conc = [int(c) for c in a.concurrency.split(",")]
    ensure_pt2(a.model, a.cache, progress=print)
    common = ["--model", a.model, "--max-batch", str(a.max_batch), "--max-delay-ms", "5",
              *(["--cache-dir", a.cache] if a.cache else [])]  # fmt: skip
    servers = {rt: ServerProcess([*common, "--runtime", rt]) for rt in RUNTIMES}
    rows: dict[str, list[dict]] = {f"{rt}/c={c}": [] for rt in RUNTIMES for c in conc}
    try:
        for srv in servers.values():
            srv.start(timeout=600)
        for rep in range(a.repeats):
            for c in conc:
                for rt in variant_order(RUNTIMES, rep + c):
                    c0 = _cpu_s(servers[rt].proc.pid)
                    res = run_bench(BenchConfig(url=servers[rt].url, model=a.model,
                                                images=a.images, concurrency=[c],
                                                duration=a.duration, warmup=a.warmup))  # fmt: skip
                    pt = res.points[0]
                    cpu = _cpu_s(servers[rt].proc.pid) - c0
                    answered = max(1, pt.ok) * (pt.measure_s + a.warmup) / max(pt.measure_s, 1e-9)
                    rows[f"{rt}/c={c}"].append({
                        "server_cpu_ms_per_image": cpu / answered * 1e3,
                        "repeat": rep, "req_per_s": pt.throughput_rps,
                        "p50_ms": pt.latency_ms.get("p50"), "errors": pt.errors.get("total", 0),
                        "mean_batch": pt.mean_batch_size,
                        "infer_ms": pt.breakdown_ms.get("infer"),
                    })  # fmt: skip
                    print(f"rep {rep} c={c} {rt}: {pt.throughput_rps:.2f} req/s, "
                          f"p50 {pt.latency_ms.get('p50')} ms", flush=True)  # fmt: skip
    finally:
        for srv in servers.values():
            srv.stop()
    table = {}
    for c in conc:
        o, t = rows[f"onnxruntime/c={c}"], rows[f"torch/c={c}"]
        ratio_rps = [b["req_per_s"] / x["req_per_s"] for x, b in zip(o, t, strict=True)]
        ratio_p50 = [b["p50_ms"] / x["p50_ms"] for x, b in zip(o, t, strict=True)]
        ratio_cpu = [b["server_cpu_ms_per_image"] / x["server_cpu_ms_per_image"]
                     for x, b in zip(o, t, strict=True)]  # fmt: skip
        table[f"c={c}"] = {
            **{name: {"req_per_s": median_range(r["req_per_s"] for r in rs),
                      "p50_ms": median_range(r["p50_ms"] for r in rs),
                      "server_cpu_ms_per_image": median_range(
                          r["server_cpu_ms_per_image"] for r in rs)}
               for name, rs in (("onnxruntime", o), ("torch", t))},
            "torch_over_ort": {"req_per_s": round(statistics.median(ratio_rps), 3),
                               "p50": round(statistics.median(ratio_p50), 3),
                               "server_cpu_per_image": round(statistics.median(ratio_cpu), 3)},
        }  # fmt: skip
        print(f"c={c}: {table[f'c={c}']}")
    write_benchmark(a.out, "torch_vs_ort", vars(a), table=table, rows=rows,
                    note="busy shared 2-core machine: ratios of interleaved runs, not absolute")  # fmt: skip
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Multi-DNN pipelines end to end over each broker: throughput, latency and the broker's
share of it, side by side in one run.

For each pipeline (OCR: text detection -> recognition of every text region; detect ->
classify: YOLOS-tiny -> ResNet-18 on each of ``objects`` crops) and each broker
(in-process, Redis Streams), a `cvserve serve --pipeline` process is loaded by
`cvserve bench` at each concurrency. The stage B worker runs inside the server in both
cases, so the brokers differ only in how items travel. Then the detect -> classify
pipeline is swept over ``objects`` (the fan-out, i.e. the rate mismatch between stages).

    python benchmarks/brokers.py                        # ~3 minutes
    python benchmarks/brokers.py --duration 4 --concurrency 1 --objects 1,8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE))

from broker_hop import _start_redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from cvserve.bench import BenchConfig, run_bench  # noqa: E402
from cvserve.bench.results import write_benchmark  # noqa: E402
from cvserve.serving.process import ServerProcess  # noqa: E402

PIPELINES = {
    "ocr": {"kind": "ocr", "images": DATA / "ocr", "params": {}},
    "detect-classify": {
        "kind": "detect-classify",
        "images": DATA / "images" / "small",
        "params": {"objects": 8},
    },  # fmt: skip
}


def serve_config(path: Path, name: str, kind: str, broker: str, params: dict, cache) -> Path:
    import yaml

    cfg = {
        "server": {"broker": broker, **({"cache_dir": cache} if cache else {})},
        "pipelines": [
            {
                "name": name,
                "kind": kind,
                "stage_workers": 1,
                "block_ms": 5,
                "max_batch_size": 16,
                "params": params,
            }
        ],  # fmt: skip
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def measure(name, kind, broker, params, images, conc, a, tmp) -> list[dict]:
    cfg = serve_config(Path(tmp) / f"{name}.yaml", name, kind, broker, params, a.cache_dir)
    with ServerProcess(["--config", str(cfg)]) as srv:
        res = run_bench(BenchConfig(
            url=srv.url, model=name, kind="pipeline", images=str(images), concurrency=conc,
            duration=a.duration, warmup=a.warmup,
        ))  # fmt: skip
    rows = []
    for p in res.points:
        rows.append({
            "pipeline": name, "broker": broker.split(":")[0], "params": params,
            "concurrency": p.concurrency, "throughput_rps": p.throughput_rps,
            "p50_ms": p.latency_ms["p50"], "p99_ms": p.latency_ms["p99"],
            "errors": p.errors["total"], "mean_batch_size": p.mean_batch_size,
            "broker_ms": p.breakdown_ms.get("broker", 0.0),
            "broker_pct": p.breakdown_pct.get("broker", 0.0),
            "breakdown_ms": p.breakdown_ms,
        })  # fmt: skip
        print(f"{name:16s} {broker.split(':')[0]:9s} {params} c={p.concurrency} "
              f"{p.throughput_rps:6.2f} req/s p50 {p.latency_ms['p50']:8.1f} ms "
              f"broker {rows[-1]['broker_ms']:7.1f} ms ({rows[-1]['broker_pct']:.0f}%) "
              f"errors {p.errors['total']}", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--objects", default="1,8,32", help="detect-classify fan-out sweep")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(HERE / "results" / "brokers.json"))
    a = p.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, redis_url, _ = _start_redis(tmp)
        try:
            for name in a.pipelines.split(","):
                spec = PIPELINES[name]
                for broker in ("inprocess://", redis_url):
                    rows += measure(name, spec["kind"], broker, spec["params"], spec["images"],
                                    conc, a, tmp)  # fmt: skip
            for n in [int(x) for x in a.objects.split(",") if x]:
                for broker in ("inprocess://", redis_url):
                    rows += measure("detect-classify", "detect-classify", broker, {"objects": n},
                                    PIPELINES["detect-classify"]["images"], [conc[-1]], a, tmp)  # fmt: skip
        finally:
            redis_proc.kill()
            redis_proc.wait()

    t = Table(title="pipelines over brokers (broker = publish-to-consume of both hops, "
                    "including time queued for a worker)")  # fmt: skip
    for col in (
        "pipeline",
        "fan-out",
        "broker",
        "c",
        "req/s",
        "p50 ms",
        "p99 ms",
        "broker ms",
        "broker %",
    ):
        t.add_column(col, justify="left" if col in ("pipeline", "broker") else "right")
    for r in rows:
        t.add_row(
            r["pipeline"], str(r["params"].get("objects", "regions")), r["broker"],
            str(r["concurrency"]), f"{r['throughput_rps']:.2f}", f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}", f"{r['broker_ms']:.1f}", f"{r['broker_pct']:.0f}%",
        )  # fmt: skip
    Console().print(t)
    print(f"wrote {write_benchmark(a.out, 'brokers', a, rows=rows)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

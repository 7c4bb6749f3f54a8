"""The paper's pipeline as a preset, over Redis: where a request's time goes at
concurrency 1 and 16.

``detect-embed``: YOLOS-tiny detects (the top ``--objects`` boxes, random weights), each
crop (10% margin, square) goes through Redis Streams to an embedding step in a
``cvserve worker`` process, and a gallery of ``--identities`` random named vectors names
each crop's 3 nearest. The embedder stands in for a face network: ``resnet18``'s ONNX
registered as task ``embed`` (its 1000 logits as the vector; the cost of a ResNet-18 per
crop is what matters here; the preset's default is the zoo's ``dinov2-small``). Reported per concurrency: throughput,
p50/p99 and the mean time per stage from ``Server-Timing`` (``broker``: both hops and the
time queued for the worker), and per step from ``GET /v1/pipelines/faces``.

    python benchmarks/detect_embed.py --duration 15
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE))

from broker_hop import _start_redis  # noqa: E402

from cvserve.bench import BenchConfig, run_bench  # noqa: E402
from cvserve.machine import machine_info  # noqa: E402
from cvserve.serving.process import ServerProcess  # noqa: E402

CONFIG = """
server:
  broker: "{redis}"
pipelines:
  - name: faces
    kind: detect-embed
    stage_workers: 0
    block_ms: 5
    params: {{detector: yolos-tiny, embedder: resnet18-embed, objects: {objects},
             gallery: "{gallery}", neighbours: 3}}
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--identities", type=int, default=1000)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(HERE / "results" / "detect_embed.json"))
    a = p.parse_args()

    from cvserve.models import store

    meta = store.ensure_built("resnet18", a.cache_dir)
    store.add_model(store.model_path(meta, a.cache_dir), "resnet18-embed", task="embed",
                    spec=meta.preprocess, cache=a.cache_dir, overwrite=True)  # fmt: skip
    store.ensure_built("yolos-tiny", a.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        names = np.array([f"id{i:04d}" for i in range(a.identities)])
        vectors = np.random.default_rng(0).normal(size=(a.identities, 1000))
        np.savez(Path(tmp) / "gallery.npz", names=names, vectors=vectors)
        redis_proc, redis_url, version = _start_redis(tmp)
        cfg = Path(tmp) / "faces.yaml"
        cfg.write_text(CONFIG.format(redis=redis_url, objects=a.objects,
                                     gallery=Path(tmp) / "gallery.npz"))  # fmt: skip
        cache = ["--cache-dir", a.cache_dir] if a.cache_dir else []
        worker = subprocess.Popen(
            [sys.executable, "-m", "cvserve", "worker", "--config", str(cfg), "--pipeline",
             "faces", "--stage", "embed", "--broker", redis_url, *cache],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            while not (line := worker.stdout.readline()).startswith("worker: "):
                if not line and worker.poll() is not None:
                    raise SystemExit("the worker exited")
            with ServerProcess(["--config", str(cfg), *cache]) as srv:
                res = run_bench(BenchConfig(
                    url=srv.url, model="faces", kind="pipeline",
                    images=str(DATA / "images" / "small"),
                    concurrency=[int(c) for c in a.concurrency.split(",")],
                    duration=a.duration, warmup=a.warmup, timeout=120,
                ))  # fmt: skip
                steps = httpx.get(f"{srv.url}/v1/pipelines/faces", timeout=30).json()["steps"]
        finally:
            worker.terminate()
            worker.wait(30)
            redis_proc.terminate()
            redis_proc.wait(30)
    rows = []
    for pt in res.points:
        rows.append({"concurrency": pt.concurrency, "throughput_rps": pt.throughput_rps,
                     "p50_ms": pt.latency_ms["p50"], "p99_ms": pt.latency_ms["p99"],
                     "errors": pt.errors["total"], "breakdown_ms": pt.breakdown_ms,
                     "breakdown_pct": pt.breakdown_pct})  # fmt: skip
        parts = "  ".join(f"{k} {v:.1f}" for k, v in pt.breakdown_ms.items())
        print(
            f"c={pt.concurrency:<3} {pt.throughput_rps:6.2f} req/s  p50 "
            f"{pt.latency_ms['p50']:8.1f} ms  p99 {pt.latency_ms['p99']:8.1f} ms  | {parts}"
        )
    per_step = {s["name"]: s["stats"] for s in steps}
    for name, st in per_step.items():
        if st["calls"]:
            print(f"  step {name:8s} calls {st['calls']:5d} items {st['items']:6d} "
                  f"work {st['seconds'] / st['calls'] * 1000:8.1f} ms/call  broker "
                  f"{st['broker_seconds'] / st['calls'] * 1000:8.1f} ms/call  batches "
                  f"{st['batch_sizes']}")  # fmt: skip
    Path(a.out).write_text(json.dumps({
        "benchmark": "detect_embed", "config": vars(a), "machine": machine_info(),
        "redis": version, "note": "busy shared machine; the embedder is resnet18 as a "
        "stand-in (task embed)", "points": rows, "steps": per_step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

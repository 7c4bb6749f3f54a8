"""What warming a model up at start costs: for each zoo model built in the store, the time
(wall and CPU) to open it and to warm it up at every batch size it will run (1 to
``--max-batch``, as ``ModelServer.warm_up`` does at start-up and on every load), beside the
old warm-up (one full batch and one single image), and the first request's infer time
after each against a steady one.

    python benchmarks/warmup_cost.py                     # every zoo model built
    python benchmarks/warmup_cost.py --models resnet18,tiny-resnet --max-batch 8

Writes benchmarks/results/warmup_cost.json and prints one line per model. Wall times on a
busy machine are long; CPU times (``time.process_time``) are the steadier number.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cvserve.bench.results import write_benchmark
from cvserve.config import BatchConfig, ModelConfig, ServerConfig
from cvserve.models import store
from cvserve.models.versions import model_versions
from cvserve.models.zoo import ZOO
from cvserve.serving.core import PreprocessPool
from cvserve.serving.loading import open_model
from cvserve.serving.metrics import Metrics

HERE = Path(__file__).resolve().parent


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    w, c = clocks()
    return round(w - t[0], 3), round(c - t[1], 3)


def measure(name: str, a: argparse.Namespace) -> dict:
    cfg = ServerConfig(cache_dir=a.cache_dir)
    mc = ModelConfig(name, batching=BatchConfig(max_batch_size=a.max_batch))
    meta = model_versions(name, a.cache_dir)[1]
    row: dict = {"model": name}
    for kind in ("every_size", "old"):
        t = clocks()
        ms = open_model(cfg, mc, 1, meta, PreprocessPool(1), Metrics())
        row["open_s"], row["open_cpu_s"] = since(t)
        rt = ms._runtimes[0]
        x = np.zeros((a.max_batch, *ms.spec.input_shape), ms.spec.dtype)
        t = clocks()
        if kind == "every_size":
            ms.warm_up()
        else:
            rt.run(x)
            rt.run(x[:1])
        row[f"warm_up_{kind}_s"], row[f"warm_up_{kind}_cpu_s"] = since(t)
        firsts = {}
        for n in (3, 5):  # sizes the old warm-up never ran
            t0 = time.perf_counter()
            rt.run(x[:n])
            firsts[n] = time.perf_counter() - t0
        steady = {n: statistics.median(_times(rt, x[:n], a.steady)) for n in (3, 5)}
        row[f"first_over_steady_{kind}"] = round(
            statistics.mean(firsts[n] / steady[n] for n in (3, 5)), 2
        )
    print(row, file=sys.stderr, flush=True)
    return row


def _times(rt, x, k: int) -> list[float]:
    out = []
    for _ in range(k):
        t0 = time.perf_counter()
        rt.run(x)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated (default: every zoo model built)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--steady", type=int, default=5, help="steady runs per size measured")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(HERE / "results" / "warmup_cost.json"))
    a = p.parse_args()
    names = [n for n in a.models.split(",") if n] or [
        e.name for e in store.list_models(a.cache_dir) if e.built and e.name in ZOO
    ]
    rows = [measure(n, a) for n in names]
    path = write_benchmark(a.out, "warmup_cost", a, rows=rows)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

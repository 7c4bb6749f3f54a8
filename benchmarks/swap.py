"""Swapping model versions under load: what the clients see when a new version of a served
model is loaded while it serves (``--model-control explicit``, ``serving/control.py``).

One cvserve server (resnet18 by default, in a store of its own holding copies of it as
versions 1, 2, ...) under closed-loop load (``--concurrency`` threads, each an
``httpx.Client`` with keep-alive, posting the medium photos). The run alternates phases of
``--duration`` seconds, in the interleaved order of ``_interleave.variant_order``:

* ``steady``: load only;
* ``swaps``: every ``--every`` seconds a new version is added to the store and loaded
  (``POST /v1/models/{m}:load``): it is opened, warmed up at every batch size, published;
  the old one finishes what it admitted and is unloaded.

Counted per phase: requests, failures (any status but 200, or a transport error), p50 and
p99 latency; for ``swaps`` also the p99 of requests that started while a load was under
way or within ``--settle`` seconds after it (the "during swaps" p99). The ratio quoted is
that p99 over the p99 of the ``steady`` phases (goal: <= 1.5x, 0 failures).

    python benchmarks/swap.py                          # resnet18, c=16, 60 s phases, 10 s
    python benchmarks/swap.py --model tiny-resnet --duration 10 --every 2 --repeats 1

Writes benchmarks/results/swap.json and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess

HERE = Path(__file__).resolve().parent


def client(url: str, model: str, images: list[bytes], k: int, stop: threading.Event,
           out: list[tuple[float, float, str]], lock: threading.Lock) -> None:  # fmt: skip
    """One closed-loop client: (start, latency s, outcome) of each request."""
    i = k
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            t = time.monotonic()
            try:
                r = c.post(f"/v1/models/{model}:predict", content=images[i % len(images)],
                           headers={"content-type": "image/jpeg"})  # fmt: skip
                what = str(r.status_code)
            except httpx.TransportError as e:
                what = type(e).__name__
            with lock:
                out.append((t, time.monotonic() - t, what))
            i += 1


def add_version(src: Path, cache: Path, name: str, n: int) -> None:
    """Version ``n`` of ``name`` in ``cache``: a hard link (or copy) of the built model."""
    dst = store.version_dir(name, n, cache)
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("model.onnx", "model.json"):
        try:
            (dst / f).hardlink_to(src / f)
        except OSError:
            shutil.copyfile(src / f, dst / f)


def pct(lat: list[float], q: float) -> float | None:
    return round(float(np.percentile(lat, q)) * 1000, 1) if lat else None


def phase(a, url: str, images, variant: str, state: dict) -> dict:
    out: list[tuple[float, float, str]] = []
    lock, stop = threading.Lock(), threading.Event()
    threads = [threading.Thread(target=client, args=(url, a.model, images, k, stop, out, lock))
               for k in range(a.concurrency)]  # fmt: skip
    windows: list[tuple[float, float]] = []
    load_s: list[float] = []
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - t0 < a.duration:
            next_at = t0 + (len(windows) + 1) * a.every
            if variant != "swaps" or next_at > t0 + a.duration - a.settle:
                time.sleep(max(0.0, min(t0 + a.duration, next_at) - time.monotonic()))
                continue
            time.sleep(max(0.0, next_at - time.monotonic()))
            state["version"] += 1
            add_version(state["src"], state["cache"], a.model, state["version"])
            w0 = time.monotonic()
            r = httpx.post(f"{url}/v1/models/{a.model}:load", timeout=300)
            w1 = time.monotonic()
            if r.status_code != 200:
                raise RuntimeError(f"load of version {state['version']} failed: {r.text}")
            windows.append((w0, w1 + a.settle))
            load_s.append(round(w1 - w0, 2))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    counts = Counter(w for _, _, w in out)
    lat = [d for _, d, w in out if w == "200"]
    during = [d for s, d, w in out if w == "200" and any(a0 <= s <= a1 for a0, a1 in windows)]
    row = {
        "variant": variant,
        "requests": len(out),
        "outcomes": dict(counts),
        "failed": len(out) - counts["200"],
        "throughput_rps": round(len(out) / a.duration, 2),
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "swaps": len(windows),
        "load_s": load_s,
        "requests_during_swaps": len(during),
        "p99_during_swaps_ms": pct(during, 99),
        "p50_during_swaps_ms": pct(during, 50),
    }
    print(f"{variant}: {row['requests']} requests, {row['failed']} failed, p99 {row['p99_ms']} ms"
          + (f", during swaps {row['p99_during_swaps_ms']} ms, loads {load_s} s"
             if variant == "swaps" else ""), file=sys.stderr, flush=True)  # fmt: skip
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", default=str(HERE.parent.parent / "shared/data/images/medium"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of each phase")
    p.add_argument("--every", type=float, default=10.0, help="seconds between swaps")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds after a load still counted as 'during' it")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="pairs of phases (steady, swaps)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--cache-dir", default=None, help="where the built model is (its store)")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--out", default=str(HERE / "results" / "swap.json"))
    a = p.parse_args()

    meta = store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    src = store.model_path(meta, a.cache_dir).parent
    images = [f.read_bytes() for f in sorted(Path(a.images).glob("*.jpg"))]
    from _interleave import variant_order  # beside this script

    rows = []
    with tempfile.TemporaryDirectory(prefix="cvserve-swap-") as tmp:
        cache = Path(tmp)
        add_version(src, cache, a.model, 1)
        state = {"src": src, "cache": cache, "version": 1}
        args = ["--model", a.model, "--cache-dir", str(cache), "--model-control", "explicit",
                "--max-batch-size", str(a.max_batch), "--max-delay-ms", "5"]  # fmt: skip
        with ServerProcess(args) as srv:
            for rep in range(a.repeats):
                for variant in variant_order(["steady", "swaps"], rep):
                    rows.append(phase(a, srv.url, images, variant, state))
            final = httpx.get(f"{srv.url}/v1/repository", timeout=30).json()

    steady = [r["p99_ms"] for r in rows if r["variant"] == "steady" and r["p99_ms"]]
    during = [r["p99_during_swaps_ms"] for r in rows if r["p99_during_swaps_ms"]]
    whole = [r["p99_ms"] for r in rows if r["variant"] == "swaps" and r["p99_ms"]]
    summary = {
        "failed_requests": sum(r["failed"] for r in rows),
        "swaps": sum(r["swaps"] for r in rows),
        "p99_steady_ms": float(np.median(steady)) if steady else None,
        "p99_during_swaps_ms": float(np.median(during)) if during else None,
        "p99_swap_phases_ms": float(np.median(whole)) if whole else None,
        "final_index": final["models"],
    }
    if steady and during:
        summary["p99_during_swaps_over_steady"] = round(
            summary["p99_during_swaps_ms"] / summary["p99_steady_ms"], 2
        )
        summary["p99_swap_phases_over_steady"] = round(
            summary["p99_swap_phases_ms"] / summary["p99_steady_ms"], 2
        )
    print(summary, file=sys.stderr)
    path = write_benchmark(a.out, "swap", a, summary=summary, rows=rows)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

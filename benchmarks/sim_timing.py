"""How closely the simulated accelerator's real run time follows its profile, here and now.

The unit tests check that ``SimulatedRuntime.run`` asks for the profile's time (on an
exact clock); how long the machine then really takes is a matter of its load, and is
measured here: per batch size, the wall time of ``run`` against the profile's latency
(overshoot in ms and %), median and max over ``--repeats`` runs, with one device and, for
two runtimes side by side, with ``--devices 2`` (do they overlap?).

    python benchmarks/sim_timing.py
    python benchmarks/sim_timing.py --profile 1:50,8:100,32:250 --batches 1,4,8,16,40

Needs the zoo extra (it builds tiny-resnet for its shapes). Writes
``benchmarks/results/sim_timing.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _timed_runs(rt, n: int, repeats: int) -> list[float]:
    x = np.zeros((n, 3, 32, 32), np.float32)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.run(x)
        out.append(time.perf_counter() - t0)
    return out


def _side_by_side(onnx: str, profile: str, devices: int) -> float:
    """Seconds for two runtimes sharing ``devices`` to run one batch each, together."""
    from cvserve.runtime import SimDevice, SimModel, SimulatedRuntime

    model, dev = SimModel(onnx), SimDevice(profile, devices=devices)
    rts = [SimulatedRuntime(onnx, dev, model=model) for _ in range(2)]
    for rt in rts:
        rt.run(np.zeros((1, 3, 32, 32), np.float32))
    start = threading.Barrier(2)

    def go(rt):
        start.wait()
        rt.run(np.zeros((1, 3, 32, 32), np.float32))

    threads = [threading.Thread(target=go, args=(rt,)) for rt in rts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="1:50,8:100,32:250")
    p.add_argument("--batches", default="1,4,8,16,40")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cache-dir", help="model store (default: a temporary one)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "sim_timing.json")
    a = p.parse_args()

    from rich.console import Console

    from cvserve.bench.console import fit_table
    from cvserve.bench.results import write_benchmark
    from cvserve.models import store
    from cvserve.runtime import SimProfile, SimulatedRuntime

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(a.cache_dir or tmp)
        onnx = str(store.model_path(store.ensure_built("tiny-resnet", cache), cache))
        profile = SimProfile.parse(a.profile)
        rt = SimulatedRuntime(onnx, a.profile)
        rt.run(np.zeros((1, 3, 32, 32), np.float32))  # resolves the output shapes
        rows = []
        for n in (int(b) for b in a.batches.split(",")):
            want = profile.latency_s(n)
            took = _timed_runs(rt, n, a.repeats)
            over = [(t - want) * 1000.0 for t in took]
            rows.append({"batch": n, "profile_ms": want * 1000.0,
                         "median_ms": statistics.median(took) * 1000.0,
                         "overshoot_ms_median": statistics.median(over),
                         "overshoot_ms_max": max(over),
                         "overshoot_pct_max": 100.0 * max(over) / (want * 1000.0)})  # fmt: skip
        one = profile.latency_s(1)
        pair = {f"devices_{d}_x_profile": _side_by_side(onnx, a.profile, d) / one for d in (1, 2)}

    write_benchmark(a.out, "sim_timing", a, rows=rows, side_by_side=pair)
    Console(width=80).print(
        fit_table(
            ["batch", "profile ms", "median ms", "over p50", "over max", "max %"],
            [
                [
                    r["batch"],
                    r["profile_ms"],
                    r["median_ms"],
                    r["overshoot_ms_median"],
                    r["overshoot_ms_max"],
                    r["overshoot_pct_max"],
                ]
                for r in rows
            ],  # fmt: skip
            title=f"simulated accelerator, profile {a.profile}, {a.repeats} runs each",
            caption=[
                "over = wall time of run() minus the profile's latency (ms)",
                "two runtimes at once, 1 device: "
                f"{pair['devices_1_x_profile']:.2f}x the batch-1 latency (want 2); "
                f"2 devices: {pair['devices_2_x_profile']:.2f}x (want 1)",
            ],
        )
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

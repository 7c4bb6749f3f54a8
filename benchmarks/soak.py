"""Memory under a long mixed load: good photos, huge images (50 megapixels, as JPEG and as
PNG) and malformed files, sent by closed-loop clients for ``--duration`` seconds while the
server's RSS is sampled every ``--sample-every`` seconds.

The goal (issue 12, part 2): RSS stays within 10% of its level after the first minute
(``--settle``); every answer is one the mix asks for (200, 400, 413, 415, or 429 when
the pixel budget or the queue is full), never a 5xx.

    python benchmarks/soak.py                       # resnet18, 600 s, 16 clients
    python benchmarks/soak.py --quick               # 60 s, settles after 20 s
    python benchmarks/soak.py --serve-args '--max-pixels-in-flight 120000000'
"""

from __future__ import annotations

import argparse
import io
import random
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from fuzz import rss_mb  # a sibling script: benchmarks/ is sys.path[0]
from PIL import Image
from rich.console import Console
from rich.table import Table

from cvserve.bench import BenchConfig, BenchImage, run_bench
from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
GOAL_GROWTH = 0.10
HUGE = (8660, 5773)  # 50 megapixels


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def huge_images() -> list[BenchImage]:
    """A 50 MP JPEG (decoded at reduced scale) and a 50 MP PNG (decoded in full)."""
    w, h = HUGE
    photo = Image.open(DATA / "images" / "small" / "dog.jpg").convert("RGB")
    jpeg = _encode(photo.resize(HUGE, Image.Resampling.BILINEAR), "JPEG", quality=85)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), -1).astype(np.uint8)
    png = _encode(Image.fromarray(rgb), "PNG", compress_level=1)
    return [BenchImage("huge.jpg", jpeg, "image/jpeg"), BenchImage("huge.png", png, "image/png")]


def mutated(photos: list[bytes], n: int, rng: random.Random) -> list[BenchImage]:
    """Real photos with a few bytes of their header changed or their tail cut off."""
    out = []
    for i in range(n):
        d = bytearray(rng.choice(photos))
        if i % 2:
            del d[rng.randrange(64, len(d)) :]  # truncated
        else:
            for _ in range(rng.randint(1, 4)):
                d[rng.randrange(2, min(len(d), 600))] = rng.randrange(256)
        out.append(BenchImage(f"mutated-{i}.jpg", bytes(d), "image/jpeg"))
    return out


def image_mix(a, rng: random.Random) -> tuple[list[BenchImage], dict[str, int]]:
    """``--good``/``--huge``/``--malformed`` shares of one shuffled cycle of 200 images."""
    good = [BenchImage(p.name, p.read_bytes(), "image/jpeg")
            for p in sorted((DATA / "images" / "medium").glob("*.jpg"))]  # fmt: skip
    bad = [BenchImage(p.name, p.read_bytes(), "application/octet-stream")
           for p in sorted((DATA / "bad").iterdir()) if p.is_file()]  # fmt: skip
    bad += mutated([g.data for g in good], 40, rng)
    huge = huge_images()
    total = a.good + a.huge + a.malformed
    counts = {k: round(200 * getattr(a, k) / total) for k in ("good", "huge", "malformed")}
    mix = [good[i % len(good)] for i in range(counts["good"])]
    mix += [huge[i % len(huge)] for i in range(counts["huge"])]
    mix += [bad[i % len(bad)] for i in range(counts["malformed"])]
    rng.shuffle(mix)
    return mix, counts


class Sampler(threading.Thread):
    """RSS of ``pid`` every ``every`` seconds: ``samples`` holds (seconds, MB)."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            mb = rss_mb(self.pid)
            if mb is not None:
                self.samples.append((time.monotonic() - self.t0, mb))
            self.stop.wait(self.every)


def summarize(samples: list[tuple[float, float]], settle: float) -> dict:
    after = [mb for t, mb in samples if t >= settle]
    if not after:
        return {"settled_mb": None}
    base = after[0]
    return {
        "start_mb": samples[0][1],
        "settled_mb": base,
        "max_mb": max(after),
        "end_mb": after[-1],
        "median_mb": statistics.median(after),
        "max_growth": max(after) / base - 1.0,
        "end_growth": after[-1] / base - 1.0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--serve-args", default="", help="extra `cvserve serve` flags")
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--settle", type=float, default=60.0, help="RSS baseline after this (s)")
    p.add_argument("--sample-every", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--good", type=float, default=0.7, help="share of good photos")
    p.add_argument("--huge", type=float, default=0.1, help="share of 50 MP images")
    p.add_argument("--malformed", type=float, default=0.2, help="share of malformed files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true", help="60 s, settling after 20 s")
    p.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    a = p.parse_args()
    if a.quick:
        a.duration, a.settle = 60.0, 20.0

    rng = random.Random(a.seed)
    mix, counts = image_mix(a, rng)
    store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    args = ["--model", a.model, *shlex.split(a.serve_args)]
    if a.cache_dir:
        args += ["--cache-dir", a.cache_dir]
    with ServerProcess(args, port=free_port()) as srv:
        assert srv.proc is not None
        sampler = Sampler(srv.proc.pid, a.sample_every)
        sampler.start()
        res = run_bench(BenchConfig(
            url=srv.url, model=a.model, images=mix, concurrency=[a.concurrency],
            duration=a.duration, warmup=0.0, timeout=60.0,
        ))  # fmt: skip
        sampler.stop.set()
        sampler.join()
        alive = srv.proc.poll() is None
        end_mb = rss_mb(srv.proc.pid)
    pt = res.points[0]
    status = res.rows["status"][res.rows["measured"]]
    by_status = {str(s): int((status == s).sum()) for s in np.unique(status)}
    server_errors = sum(n for s, n in by_status.items() if s.startswith("5"))
    rss = summarize(sampler.samples, a.settle)
    rss["after_load_mb"] = end_mb
    ok = alive and server_errors == 0 and (rss.get("max_growth") or 0.0) <= GOAL_GROWTH

    table = Table(title=f"soak: {a.model}, {a.duration:.0f} s, c={a.concurrency}, mix {counts}")
    for col in ("RSS start", f"after {a.settle:.0f} s", "max after", "end", "max growth",
                "req/s", "answers", "5xx", "server alive"):  # fmt: skip
        table.add_column(col, justify="right")
    table.add_row(
        f"{rss.get('start_mb', 0):.0f} MB", f"{rss.get('settled_mb') or 0:.0f} MB",
        f"{rss.get('max_mb', 0):.0f} MB", f"{rss.get('end_mb', 0):.0f} MB",
        f"{100 * rss.get('max_growth', 0):+.1f}%", f"{pt.request_rate_rps:.1f}",
        " ".join(f"{s}:{n}" for s, n in by_status.items()), str(server_errors), str(alive),
    )  # fmt: skip
    Console(width=200).print(table)
    print(f"goal: RSS within {100 * GOAL_GROWTH:.0f}% of its level after {a.settle:.0f} s, no "
          f"5xx, server alive: {'met' if ok else 'NOT met'}", file=sys.stderr)  # fmt: skip
    out = write_benchmark(
        a.out, "soak", a, mix=counts, rss=rss, by_status=by_status, server_errors=server_errors,
        server_alive=alive, goal_met=ok, requests=int(res.rows["measured"].sum()),
        request_rate_rps=pt.request_rate_rps, throughput_rps=pt.throughput_rps,
        latency_ms=pt.latency_ms, rss_samples=[[round(t, 2), round(mb, 1)] for t, mb in sampler.samples],
    )  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

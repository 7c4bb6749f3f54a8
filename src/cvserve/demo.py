"""``cvserve demo``: build a model, serve it in a child process, load it at a few
concurrencies with real images, and return the bench result that explains where time went.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cvserve.bench import BenchConfig, BenchImage, BenchResult, run_bench
from cvserve.models import store
from cvserve.models.metadata import weights_line
from cvserve.models.zoo import ZOO
from cvserve.serving.process import ServerProcess
from cvserve.trace import Say

DEFAULT_MODEL = "resnet18"
DEFAULT_CONCURRENCY = (1, 4, 16)


def default_images() -> Path | None:
    """The shared medium photos, where a checkout has them."""
    candidates = []
    if os.environ.get("CVSERVE_DATA"):
        candidates.append(Path(os.environ["CVSERVE_DATA"]) / "images" / "medium")
    here = Path(__file__).resolve()
    candidates += [
        Path.cwd() / ".." / "shared" / "data" / "images" / "medium",
        here.parents[3] / "shared" / "data" / "images" / "medium",
    ]
    for c in candidates:
        if c.is_dir() and any(c.glob("*.jpg")):
            return c.resolve()
    return None


def synthetic_images(n: int = 8, size: tuple[int, int] = (1600, 1200)) -> list[BenchImage]:
    """Photo-sized JPEGs with smooth structure and noise, for machines without the data set."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        f = 0.002 + 0.002 * i
        base = np.stack(
            [np.sin(xx * f + i), np.cos(yy * f * 1.3 - i), np.sin((xx + yy) * f * 0.7)], -1
        )
        px = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, base.shape)).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(px.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(BenchImage(f"synthetic-{i}.jpg", buf.getvalue(), "image/jpeg"))
    return out


def run_demo(
    model: str = DEFAULT_MODEL,
    images: Path | str | Sequence[BenchImage] | None = None,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    duration: float = 5.0,
    cache_dir: str | None = None,
    serve_args: Sequence[str] = ("--max-batch", "8", "--max-delay-ms", "5"),
    say: Say = lambda _: None,
    progress=None,
) -> BenchResult:
    """Build ``model`` if needed, serve it, sweep ``concurrency``; returns the result."""
    if model in ZOO:
        say(weights_line(model, "random"))
    meta = store.ensure_built(model, cache_dir, progress=say)
    if model not in ZOO:
        say(weights_line(model, meta.weights))
    if images is None:
        images = default_images()
        if images is None:
            say("no shared photos found: using synthetic 1600x1200 JPEGs")
            images = synthetic_images()
    args = ["--model", model, *serve_args]
    if cache_dir:
        args += ["--cache-dir", str(cache_dir)]
    say(f"starting server: cvserve serve {' '.join(args)}")
    with ServerProcess(args) as server:
        say(f"server ready on {server.url}; measuring concurrency {list(concurrency)}")
        config = BenchConfig(
            url=server.url,
            model=model,
            images=images,
            concurrency=list(concurrency),
            duration=duration,
            warmup=1.0,
        )
        return run_bench(config, progress=progress)

"""``cvserve demo``: build a model, serve it in a child process, load it at a few
concurrencies with real images, and explain the result: findings in sentences, the bench's
plots and an HTML page in the study report's style, and what to try next.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from cvserve.bench import BenchConfig, BenchImage, BenchResult, run_bench
from cvserve.bench.inputs import synthetic_images
from cvserve.models import store
from cvserve.models.metadata import weights_line
from cvserve.models.zoo import ZOO
from cvserve.serving.process import ServerProcess
from cvserve.trace import Say

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MODEL",
    "default_images",
    "demo_images",
    "findings",
    "next_steps",
    "refusal_notes",
    "run_demo",
    "synthetic_images",
    "write_demo_report",
]

DEFAULT_MODEL = "resnet18"
DEFAULT_CONCURRENCY = (1, 4, 16)
PREPROCESS = ("decode", "resize", "normalize")
WAITING = ("queue", "batch_wait")


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


def demo_images(out: str | os.PathLike[str], say: Say = lambda _: None) -> Path:
    """The shared medium photos; without them, synthetic ones written to ``out/photos``
    (so the next steps can point at them)."""
    found = default_images()
    if found is not None:
        return found
    folder = Path(out) / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for image in synthetic_images():
        (folder / image.name).write_bytes(image.data)
    say(f"no shared photos found: using synthetic 1600x1200 JPEGs, written to {folder}")
    return folder


def run_demo(
    model: str = DEFAULT_MODEL,
    images: Path | str | Sequence[BenchImage] | None = None,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    duration: float = 5.0,
    cache_dir: str | None = None,
    serve_args: Sequence[str] = ("--max-batch-size", "8", "--max-delay-ms", "5"),
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


# --- explaining the result ------------------------------------------------------------------
def _share(p, stages: Sequence[str]) -> float:  # noqa: ANN001
    return sum(p.breakdown_pct.get(s, 0.0) for s in stages)


def findings(result: BenchResult) -> list[str]:
    """What the sweep shows, in sentences computed from its numbers."""
    pts = [p for p in result.points if p.ok]
    if not pts:
        return ["No request succeeded: see the errors in the table."]
    out = []
    first, last = pts[0], pts[-1]
    out.append(
        f"At {first.load_label}, a request took {first.latency_ms['mean']:.0f} ms on average: "
        f"{_share(first, PREPROCESS):.0f}% decoding, resizing and normalizing the image, "
        f"{first.breakdown_pct.get('infer', 0.0):.0f}% in the DNN and "
        f"{_share(first, WAITING):.0f}% waiting."
    )
    if last is not first:
        gain = last.throughput_rps / first.throughput_rps if first.throughput_rps else 0.0
        out.append(
            f"From {first.load_label} to {last.load_label}, throughput went from "
            f"{first.throughput_rps:.1f} to {last.throughput_rps:.1f} req/s ({gain:.2f}x) "
            f"while the mean latency went from {first.latency_ms['mean']:.0f} to "
            f"{last.latency_ms['mean']:.0f} ms, {_share(last, WAITING):.0f}% of it waiting "
            "in the queue and the batcher: "
            + (
                "past saturation, more load only queues."
                if gain >= 1.1
                else "the server (or the machine, if it was busy) was saturated from the start, so "
                "more load only queued."
            )
        )
        if last.mean_batch_size:
            out.append(
                f"Batches held {last.mean_batch_size:.1f} images on average at "
                f"{last.load_label} (1 at {first.load_label}): requests that arrive together "
                "share one DNN call."
            )
    return out + refusal_notes(result)


def refusal_notes(result: BenchResult, max_queue: int = 64) -> list[str]:
    """Why a point got 429s, where it did (a closed loop of up to ``max_queue`` clients is
    queued, not refused, so any 429 there deserves a word)."""
    notes = []
    for p in result.points:
        n = int(p.errors.get("by_status", {}).get("429", 0))
        if not n:
            continue
        deep = p.concurrency is not None and p.concurrency > max_queue
        why = (
            f"more clients than the model's --max-queue ({max_queue}) admits at once"
            if deep
            else "the server expected their wait to pass their deadline (admission by "
            "time: the queue was counted as growing, e.g. while the machine was busy with "
            "other work); a closed loop this size is normally queued, not refused"
        )
        notes.append(
            f"{n} requests at {p.load_label} got 429 Too Many Requests: {why}. The 429's "
            "body says the expected wait, the limit and the queue; see docs/serving.md "
            "(Admission). The clients waited for its Retry-After before sending again."
        )
    return notes


def next_steps(model: str, out: Path, images: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(what, command) pairs to try after the demo (each ``cvserve`` command parses)."""
    images = shlex.quote(str(images))
    return [
        ("Serve it yourself and send a photo", f"cvserve serve --model {model} --port 8000"),
        (
            "Ask it, and read where the time went (the Server-Timing header)",
            "curl -i --data-binary @photo.jpg -H 'content-type: image/jpeg' "
            f"http://127.0.0.1:8000/v1/models/{model}:predict",
        ),
        (
            "Compare another model (or your own settings) with this run",
            f"cvserve bench --inprocess --model resnet50 --images {images} --concurrency 1,4,16 "
            f"--out r50.json && cvserve report {shlex.quote(str(out / 'demo.json'))} r50.json "
            "--out compare/",
        ),
        (
            "Find the best settings within a p99 SLO (minutes)",
            f"cvserve tune {model} --images {images} --slo-p99-ms 200 --out {model}.yaml",
        ),
        ("Rerun the paper's experiments (a few minutes)", "cvserve study --quick"),
    ]


def write_demo_report(
    result: BenchResult,
    out: str | os.PathLike[str],
    model: str,
    images: str | os.PathLike[str],
    command: str | None = None,
) -> Path:
    """The result (``demo.json``), the bench's plots and ``report.html`` in ``out``;
    returns the page. ``command``: how to reproduce it (default: the process's argv)."""
    from cvserve.bench.report import report
    from cvserve.bench.results import save_result
    from cvserve.study.report import write_bench_page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.label = result.label or model
    save_result(result, out / "demo.json")
    plots = report([result], out)
    return write_bench_page(
        out / "report.html",
        result,
        plots,
        title=f"cvserve demo: {model}",
        findings=findings(result),
        next_steps=next_steps(model, out, images),
        command=command,
    )

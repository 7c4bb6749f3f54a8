"""What the OCR pipeline's DNN calls cost on this CPU: the numbers its CPU budget stands on.

1. Per image of ``../shared/data/ocr``, the detector, the angle classifier and the
   recognizer (the real steps: ``tasks.ocr.detect`` / ``recognize``), with sessions one
   core wide and as wide as the machine: the speed-up of a wide call is what a request
   alone gains from running wide; one core per call under load avoids paying its
   inefficiency. Interleaved per repeat, same images.
2. Whether batching detection across requests pays: two images of one padded size run
   as one batch of 2 against two batches of 1 (one core, so that nothing but the batching
   differs), at the detector's common input sizes.

    python benchmarks/ocr_stages.py                       # 5 repeats
    python benchmarks/ocr_stages.py --repeats 2

Writes ``benchmarks/results/ocr_stages.json`` (``--out``) and prints two tables (ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ocr"
DET_SIZES = ((736, 736), (960, 736), (1248, 960))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def stage_costs(images: list[np.ndarray], widths: list[int], repeats: int) -> list[dict]:
    """Per width, the mean per image (ms) of each DNN's calls, median over repeats."""
    from cvserve.runtime import OrtOptions
    from cvserve.serving.pipelines.ocr import load_ocr_models
    from cvserve.tasks.ocr import OcrConfig, detect, recognize

    cfg = OcrConfig()
    models = {w: load_ocr_models(cfg, OrtOptions(intra_op_threads=w)) for w in widths}

    def timed(stage: str, fn):
        def run(batch):
            t0 = time.perf_counter()
            out = fn(batch)
            spent[stage] += time.perf_counter() - t0
            return out

        return run

    per: dict[tuple[int, str], list[float]] = {}
    for rep in range(repeats + 1):  # the first round warms the sessions up
        for w in widths:
            m = models[w]
            spent: dict[str, float] = {"det": 0.0, "cls": 0.0, "rec": 0.0}
            det, cls, rec = timed("det", m.det), timed("cls", m.cls), timed("rec", m.rec)
            for image in images:
                found = detect(image, det, cfg.det)
                if found.crops:
                    recognize(found.crops, rec, m.labels, cfg.rec, cls)
            if rep:
                for stage, s in spent.items():
                    per.setdefault((w, stage), []).append(s / len(images))
    return [
        {"width": w, "stage": stage, "ms_per_image": _median(v), "runs_ms": [x * 1e3 for x in v]}
        for (w, stage), v in sorted(per.items())
    ]


def det_batching(repeats: int) -> list[dict]:
    """Batch of 2 vs 2 batches of 1 for the detector at its common input sizes, 1 core."""
    from cvserve.models.ocr_files import ocr_model_files
    from cvserve.runtime import OrtOptions, OrtRuntime

    rt = OrtRuntime(ocr_model_files().det, OrtOptions(intra_op_threads=1))
    rng = np.random.default_rng(0)
    rows = []
    for h, w in DET_SIZES:
        one = rng.random((1, 3, h, w), dtype=np.float32)
        two = np.concatenate([one, rng.random((1, 3, h, w), dtype=np.float32)])
        rt.run(one)
        rt.run(two)
        singles, pairs = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rt.run(one)
            rt.run(one)
            t1 = time.perf_counter()
            rt.run(two)
            t2 = time.perf_counter()
            singles.append(t1 - t0)
            pairs.append(t2 - t1)
        rows.append(
            {
                "input": f"{w}x{h}",
                "two_batches_of_1_ms": _median(singles),
                "one_batch_of_2_ms": _median(pairs),
                "batched_over_single": statistics.median(pairs) / statistics.median(singles),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DATA, help="folder of text images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ocr_stages.json"
    )
    args = parser.parse_args(argv)

    from PIL import Image
    from rich.console import Console
    from rich.table import Table

    from cvserve.bench.results import write_benchmark
    from cvserve.runtime.budget import available_cores

    console = Console()
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    widths = sorted({1, available_cores()})
    costs = stage_costs(images, widths, args.repeats)
    batching = det_batching(args.repeats)

    by = {(r["width"], r["stage"]): r["ms_per_image"] for r in costs}
    table = Table(
        title=f"OCR DNN calls per image, {len(images)} images (ms, median of {args.repeats})"
    )
    table.add_column("stage")
    for w in widths:
        table.add_column(f"{w} core{'s' if w > 1 else ''}", justify="right")
    if len(widths) > 1:
        table.add_column("speed-up", justify="right")
    for stage in ("det", "cls", "rec"):
        cells = [f"{by[(w, stage)]:.1f}" for w in widths]
        if len(widths) > 1:
            cells.append(f"{by[(widths[0], stage)] / by[(widths[-1], stage)]:.2f}x")
        table.add_row(stage, *cells)
    console.print(table)
    t2 = Table(title="detector: batch of 2 vs two batches of 1, one core (ms)")
    for col in ("input", "2 x batch 1", "batch 2", "batched / single"):
        t2.add_column(col, justify="right")
    for r in batching:
        t2.add_row(
            r["input"],
            f"{r['two_batches_of_1_ms']:.0f}",
            f"{r['one_batch_of_2_ms']:.0f}",
            f"{r['batched_over_single']:.2f}",
        )
    console.print(t2)
    write_benchmark(
        args.out, "ocr_stages", args, images=[p.name for p in paths],
        stage_costs=costs, det_batching=batching,
    )  # fmt: skip
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

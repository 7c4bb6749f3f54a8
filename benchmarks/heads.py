"""What the task heads cost on the CPU: segmentation, detection and depth postprocessing,
and the JSON encoding of their dense results, at photo sizes that users send.

Raw outputs shaped like the real models' (no model runs): SegFormer-B0 on ADE20k (150
classes at 128x128, spatially smooth as real logits are), RT-DETR-R18 on COCO (300
queries x 80 classes, threshold 0.3, per-class NMS at IoU 0.5), Depth Anything (518x518).
Every head maps its output back to the photo's own size, so the cost grows with it. The
cases are interleaved within each repeat, on the same arrays; medians and spread over
the repeats.

    python benchmarks/heads.py                            # 3 sizes, 7 repeats
    python benchmarks/heads.py --sizes 2048x1362 --repeats 3

Writes ``benchmarks/results/heads.json`` (``--out``) and prints a table (ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SIZES = ("640x480", "2048x1362", "4032x3024")


def _meta(task: str, side: int, labels: int, **extra):
    from cvserve.images.spec import PreprocessSpec
    from cvserve.models.metadata import ModelMeta

    spec = PreprocessSpec(height=side, width=side, resize_mode="direct")
    return ModelMeta(
        name=f"bench-{task}", task=task, onnx_file="none.onnx", input_name="pixel_values",
        input_shape=[None, 3, side, side], input_dtype="float32", output_names=[],
        preprocess=spec, labels=[f"label{i}" for i in range(labels)], extra=extra,
    )  # fmt: skip


def _smooth_logits(rng: np.random.Generator, classes: int, side: int) -> np.ndarray:
    """Bicubically upsampled 8x8 noise per class: blobs, like a real model's logits."""
    from PIL import Image

    coarse = rng.standard_normal((classes, 8, 8)).astype(np.float32) * 5
    return np.stack(
        [
            np.asarray(Image.fromarray(c, "F").resize((side, side), Image.Resampling.BICUBIC))
            for c in coarse
        ]
    )


def cases(size: tuple[int, int]):
    """``(name, fn)`` pairs for one photo size; each fn runs once and returns its output
    size in bytes (0 for postprocessing)."""
    from cvserve.images.preprocess import ImageMeta
    from cvserve.tasks.depth import DepthHead
    from cvserve.tasks.detect import DetectHead
    from cvserve.tasks.encode import encode_result
    from cvserve.tasks.segment import SegmentHead

    rng = np.random.default_rng(0)
    meta = ImageMeta(orig_size=size, format="JPEG", reduced=1)
    seg = SegmentHead(_meta("segment", 512, 150))
    logits = _smooth_logits(rng, 150, 128)
    det = DetectHead(_meta("detect", 640, 80, architecture="rt_detr"))
    det_logits = rng.standard_normal((300, 80)).astype(np.float32) - 3
    det_boxes = rng.random((300, 4)).astype(np.float32) * 0.5 + 0.2
    dep = DepthHead(_meta("depth", 518, 0))
    depth = rng.random((518, 518)).astype(np.float32)
    seg_res = seg.postprocess([logits], meta)
    dep_res = dep.postprocess([depth], meta)
    assert seg_res["mask"].shape == dep_res["depth"].shape == (size[1], size[0])

    def seg_post() -> int:
        seg.postprocess([logits], meta)
        return 0

    def det_post() -> int:
        det.postprocess([det_logits, det_boxes], meta, threshold=0.3, nms_iou=0.5)
        return 0

    def dep_post() -> int:
        dep.postprocess([depth], meta)
        return 0

    return [
        ("segment postprocess", seg_post),
        ("segment json", lambda: len(encode_result(seg_res, "application/json")[0])),
        ("detect postprocess", det_post),
        ("depth postprocess", dep_post),
        ("depth json", lambda: len(encode_result(dep_res, "application/json")[0])),
    ]


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="photo sizes, WxH")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of every case")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "heads.json"
    )
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from cvserve.bench.results import write_benchmark

    console = Console()
    sizes = [_size(s) for s in args.sizes]
    todo = {s: cases(s) for s in sizes}
    for runs in todo.values():  # warm-up: first-touch allocations, lazy imports
        for _, fn in runs:
            fn()
    times: dict[tuple[str, tuple[int, int]], list[float]] = {}
    out_bytes: dict[tuple[str, tuple[int, int]], int] = {}
    for _ in range(args.repeats):  # interleaved: every case once per repeat
        for size, runs in todo.items():
            for name, fn in runs:
                t0 = time.perf_counter()
                n = fn()
                times.setdefault((name, size), []).append((time.perf_counter() - t0) * 1e3)
                out_bytes[(name, size)] = n

    table = Table(title=f"task heads on the CPU (ms, median of {args.repeats})")
    for col in ("case", "photo", "median", "min", "max", "output"):
        table.add_column(col, justify="right")
    summary = []
    for (name, size), ms in times.items():
        row = {
            "case": name,
            "width": size[0],
            "height": size[1],
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "runs_ms": ms,
            "output_bytes": out_bytes[(name, size)] or None,
        }
        summary.append(row)
        table.add_row(
            name,
            f"{size[0]}x{size[1]}",
            f"{row['median_ms']:.1f}",
            f"{row['min_ms']:.1f}",
            f"{row['max_ms']:.1f}",
            f"{row['output_bytes'] / 1e6:.2f} MB" if row["output_bytes"] else "",
        )
    console.print(table)
    write_benchmark(args.out, "heads", args, summary=summary)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

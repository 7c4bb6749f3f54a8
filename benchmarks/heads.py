"""What the task heads cost on the CPU: segmentation, detection and depth postprocessing,
and the JSON encoding of their dense results, at photo sizes that users send.

Raw outputs shaped like the real models' (no model runs): SegFormer-B0 on ADE20k (150
classes at 128x128, spatially smooth as real logits are), RT-DETR-R18 on COCO (300
queries x 80 classes, threshold 0.3, per-class NMS at IoU 0.5), Depth Anything (518x518).
Every head maps its output back to the photo's own size, so the cost grows with it. The
cases are interleaved within each repeat, on the same arrays; medians and spread over
the repeats.

Segmentation is measured against what it replaced, in the same run: the numpy head of
``benchmarks/_segment_numpy.py`` and Pillow's PNG encoder (the ``(before)`` rows), with the
ratio of each repeat's pair. The segmentation kernels' JIT cost is measured in two fresh
processes on an empty numba cache: the first compiles, the second loads the cache.

    python benchmarks/heads.py                            # 3 sizes, 7 repeats
    python benchmarks/heads.py --sizes 2048x1362 --repeats 3

Writes ``benchmarks/results/heads.json`` (``--out``) and prints a table (ms).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = ("640x480", "2048x1362", "4032x3024")
#: (before, after) case pairs whose per-repeat ratio is reported
PAIRS = (
    ("segment postprocess (before)", "segment postprocess"),
    ("segment json (before)", "segment json"),
)


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

    sys.path.insert(0, str(Path(__file__).parent))
    from _segment_numpy import NumpySegmentHead

    rng = np.random.default_rng(0)
    meta = ImageMeta(orig_size=size, format="JPEG", reduced=1)
    seg = SegmentHead(_meta("segment", 512, 150))
    seg_old = NumpySegmentHead(_meta("segment", 512, 150))
    logits = _smooth_logits(rng, 150, 128)
    det = DetectHead(_meta("detect", 640, 80, architecture="rt_detr"))
    det_logits = rng.standard_normal((300, 80)).astype(np.float32) - 3
    det_boxes = rng.random((300, 4)).astype(np.float32) * 0.5 + 0.2
    dep = DepthHead(_meta("depth", 518, 0))
    depth = rng.random((518, 518)).astype(np.float32)
    seg_res = seg.postprocess([logits], meta)
    dep_res = dep.postprocess([depth], meta)
    assert seg_res["mask"].shape == dep_res["depth"].shape == (size[1], size[0])
    old_mask = seg_old.postprocess([logits], meta)["mask"]
    mismatch = float((old_mask != seg_res["mask"]).mean())
    assert mismatch <= 1e-3, f"old and new segmentation heads differ on {mismatch:.2%} of pixels"

    def seg_post() -> int:
        seg.postprocess([logits], meta)
        return 0

    def seg_post_old() -> int:
        seg_old.postprocess([logits], meta)
        return 0

    def seg_post_model() -> int:
        seg.postprocess([logits], meta, mask="model")
        return 0

    def det_post() -> int:
        det.postprocess([det_logits, det_boxes], meta, threshold=0.3, nms_iou=0.5)
        return 0

    def dep_post() -> int:
        dep.postprocess([depth], meta)
        return 0

    return [
        ("segment postprocess (before)", seg_post_old),
        ("segment postprocess", seg_post),
        ("segment postprocess mask=model", seg_post_model),
        ("segment json (before)", lambda: len(_json_pillow(seg_res))),
        ("segment json", lambda: len(encode_result(seg_res, "application/json")[0])),
        ("detect postprocess", det_post),
        ("depth postprocess", dep_post),
        ("depth json", lambda: len(encode_result(dep_res, "application/json")[0])),
    ]


def _json_pillow(result: dict) -> bytes:
    """The JSON answer as cvserve encoded class maps before: Pillow's PNG writer at
    compress_level 1 (adaptive row filters, zlib), after a scan for the value range."""
    from PIL import Image

    mask = result["mask"]
    int(mask.min()), int(mask.max())
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
    doc = {k: v for k, v in result.items() if k != "mask"}
    doc["mask"] = {
        "dtype": str(mask.dtype),
        "shape": list(mask.shape),
        "encoding": "png8",
        "png_base64": base64.b64encode(buf.getvalue()).decode("ascii"),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


_JIT_PROBE = """
import json, time
t0 = time.perf_counter()
import numpy as np
from cvserve.tasks import _segment_kernels as k
t1 = time.perf_counter()
s = k.warm_up(np.dtype(np.uint8))
print(json.dumps({"import_s": t1 - t0, "warm_up_s": s}))
"""


def jit_cost() -> dict[str, float]:
    """Seconds to import and compile the segmentation kernels on an empty numba cache,
    then to import and load them from that cache, each in a fresh process."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("compile", "cached"):
            run = subprocess.run(
                [sys.executable, "-c", _JIT_PROBE], env=env, capture_output=True, text=True,
                check=True,
            )  # fmt: skip
            got = json.loads(run.stdout.strip().splitlines()[-1])
            out[f"{label}_import_s"] = got["import_s"]
            out[f"{label}_warm_up_s"] = got["warm_up_s"]
    return out


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
    jit = jit_cost()
    console.print(
        "segmentation kernels: compile {compile_warm_up_s:.2f} s on an empty cache, "
        "load {cached_warm_up_s:.2f} s from it (numba import {cached_import_s:.2f} s)".format(**jit)
    )
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
    ratios = []
    ratio_table = Table(title="before / after, per repeat (x, median and range)")
    for col in ("case", "photo", "median", "min", "max"):
        ratio_table.add_column(col, justify="right")
    for before, after in PAIRS:
        for size in sizes:
            per = [b / a for b, a in zip(times[(before, size)], times[(after, size)], strict=True)]
            row = {
                "case": after,
                "width": size[0],
                "height": size[1],
                "median": statistics.median(per),
                "min": min(per),
                "max": max(per),
            }
            ratios.append(row)
            ratio_table.add_row(
                after, f"{size[0]}x{size[1]}", f"{row['median']:.1f}", f"{row['min']:.1f}",
                f"{row['max']:.1f}",
            )  # fmt: skip
    console.print(ratio_table)
    import numba
    import zlib_ng

    versions = {"numba": numba.__version__, "zlib_ng": zlib_ng.__version__}
    write_benchmark(
        args.out, "heads", args, summary=summary, ratios=ratios, jit=jit, versions=versions
    )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

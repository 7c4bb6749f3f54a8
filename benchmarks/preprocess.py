"""Preprocessing paths against the naive one: speed, CPU, memory and fidelity, in one run.

For each path (decoder) x image class (small, medium, large shared photos) x threads (1, 2):
images/s, CPU ms per image and peak RSS, each measured in a fresh child process, paths
interleaved, repeated; then, for every shared photo, each path's model input against a
float64 reference of the naive path (PSNR, max abs error) and its effect on a classifier's
logits (cosine similarity, raw and centred on the mean logit; top-1 agreement; top-5 overlap).

    python benchmarks/preprocess.py                      # all paths, 3 repeats
    python benchmarks/preprocess.py --paths naive,pil-reduced --repeats 1 --seconds 2

The floor (``--floor-only`` runs just this part, in seconds): per size class and decoder,
cvserve's process CPU per image on one thread against libjpeg-turbo alone (simplejpeg)
decoding the same photo at the scale cvserve chose, interleaved image by image, medians of
the rounds; the decode / resize / normalize split (wall), and the model input's PSNR and
resnet50's top-5 against the full-decode reference.

    python benchmarks/preprocess.py --floor-only --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("CVSERVE_DATA", HERE.parent.parent / "shared" / "data"))
CLASSES = ("small", "medium", "large")
PATHS = ("naive", "pil", "pil-reduced", "pil-reduced-1x", "simplejpeg", "opencv")


def spec():
    from cvserve.images.spec import PreprocessSpec

    # The ResNet checkpoints' HF preprocessing: bicubic shortest edge 256, crop 224.
    return PreprocessSpec(height=224, width=224, resize_shortest=256, interpolation="bicubic")


def naive(data: bytes, sp) -> np.ndarray:
    """What most users write: full decode, resize everything, crop, float normalize."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size
    s = sp.resize_shortest
    rw, rh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    im = im.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - sp.width) // 2, (rh - sp.height) // 2
    im = im.crop((left, top, left + sp.width, top + sp.height))
    x = (np.asarray(im, dtype=np.float32) / 255.0 - np.array(sp.mean, np.float32)) / np.array(
        sp.std, np.float32
    )
    return x.transpose(2, 0, 1).copy()


def make_runner(path: str, sp):
    """A function bytes -> model input (3, 224, 224) float32 for ``path``."""
    if path == "naive":
        return lambda data: naive(data, sp)
    from cvserve.images.preprocess import Preprocessor

    decoder, margin = (path, None)
    if path == "pil-reduced-1x":
        decoder, margin = "pil-reduced", 1.0
    pre = Preprocessor(sp, decoder=decoder, **({"margin": margin} if margin else {}))

    def run(data: bytes) -> np.ndarray:
        out = np.empty(sp.input_shape, np.float32)
        pre.run(data, out)
        return out

    return run


def images(cls: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((DATA / "images" / cls).glob("*.jpg"))]


def child(path: str, cls: str, threads: int, seconds: float) -> dict:
    """Runs in a fresh process: throughput, CPU per image, peak RSS."""
    sp = spec()
    run = make_runner(path, sp)
    datas = images(cls)
    for d in datas:  # warm up (and fault in the libraries)
        run(d)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()

    def work(k: int) -> int:
        done = 0
        end = t0 + seconds
        i = k
        while time.perf_counter() < end:
            run(datas[i % len(datas)])
            i += threads
            done += 1
        return done

    with ThreadPoolExecutor(threads) as ex:
        n = sum(ex.map(work, range(threads)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "path": path, "class": cls, "threads": threads, "images": n,
        "images_per_s": n / wall, "cpu_ms_per_image": cpu * 1000 / n,
        "peak_rss_mb": rss / 1024, "rss_growth_mb": (rss - rss_before) / 1024,
    }  # fmt: skip


def available(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        mod = {"simplejpeg": "simplejpeg", "opencv": "cv2"}.get(p.split("+")[0])
        if mod:
            try:
                __import__(mod)
            except ImportError:
                print(f"skipping {p}: {mod} is not installed", file=sys.stderr)
                continue
        out.append(p)
    return out


def fidelity(paths: list[str], cache: str | None) -> dict:
    """Model input and classifier output of each path against the naive float64 path."""
    from cvserve.models import store
    from cvserve.runtime import OrtRuntime

    sp = spec()
    meta = store.ensure_built("resnet18", cache)
    rt = OrtRuntime(store.model_path(meta, cache))
    files = sorted((DATA / "images").glob("*/*.jpg"))
    refs, ref_logits = [], []
    for f in files:
        ref = naive(f.read_bytes(), sp).astype(np.float64)
        refs.append(ref)
        ref_logits.append(rt.run(ref[None].astype(np.float32))[0][0].astype(np.float64))
    mean_logit = np.mean(ref_logits, axis=0)
    peak = 1.0 / min(sp.std)  # one channel's range after normalize
    out = {}
    for path in paths:
        run = make_runner(path, sp)
        rows = []
        for f, ref, rl in zip(files, refs, ref_logits, strict=True):
            x = run(f.read_bytes()).astype(np.float64)
            lg = rt.run(x[None].astype(np.float32))[0][0].astype(np.float64)
            mse = float(np.mean((x - ref) ** 2))
            a, b = lg - mean_logit, rl - mean_logit
            rows.append({
                "image": f"{f.parent.name}/{f.name}",
                "psnr_db": float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse),
                "max_abs": float(np.abs(x - ref).max()),
                "cosine": float(lg @ rl / np.linalg.norm(lg) / np.linalg.norm(rl)),
                "cosine_centred": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                "top1_agree": int(np.argmax(lg) == np.argmax(rl)),
                "top5_overlap": len(set(np.argsort(-lg)[:5]) & set(np.argsort(-rl)[:5])) / 5,
            })  # fmt: skip
        finite = [r["psnr_db"] for r in rows if np.isfinite(r["psnr_db"])] or [float("inf")]
        out[path] = {
            "min_psnr_db": min(finite), "median_psnr_db": statistics.median(finite),
            "max_abs": max(r["max_abs"] for r in rows),
            "min_cosine": min(r["cosine"] for r in rows),
            "min_cosine_centred": min(r["cosine_centred"] for r in rows),
            "top1_agreement": statistics.mean(r["top1_agree"] for r in rows),
            "mean_top5_overlap": statistics.mean(r["top5_overlap"] for r in rows),
            "images": rows,
        }  # fmt: skip
    return out


#: What the floor comparison runs: a decoder, ``+fast`` (simplejpeg's fast IDCT and
#: upsampling), ``+pillow-resize`` (Pillow's resize and a separate normalize instead of the
#: fused pass). ``pil-reduced+pillow-resize`` is the default before issue 26.
DECODERS = (
    "pil-reduced+pillow-resize", "simplejpeg", "simplejpeg+fast", "simplejpeg+pillow-resize",
    "pil-reduced", "opencv", "pil",
)  # fmt: skip


def preprocessor(variant: str, sp):
    """The Preprocessor a floor-comparison variant names (see DECODERS)."""
    from cvserve.images.preprocess import Preprocessor

    decoder, *opts = variant.split("+")
    return Preprocessor(
        sp, decoder=decoder, fast_decode="fast" in opts, fused="pillow-resize" not in opts
    )


def _top5(rt, x: np.ndarray) -> list[int]:
    logits = rt.run(x[None].astype(np.float32))[0][0]
    return sorted(int(i) for i in np.argsort(-logits)[:5])


def floor_report(
    decoders: list[str], classes: list[str], rounds: int, cache: str | None, top5: str = "resnet50"
) -> dict:
    """cvserve's CPU per image against the decode floor, per class and decoder, with the
    stage split and the fidelity (PSNR, resnet50 top-5) against the full-decode reference."""
    from _interleave import variant_order  # beside this script

    from cvserve.images.preprocess import decode_floor

    sp = spec()
    peak = 1.0 / min(sp.std)
    rt = None
    try:
        if top5:
            from cvserve.models import store
            from cvserve.runtime import OrtRuntime

            rt = OrtRuntime(store.model_path(store.ensure_built(top5, cache), cache))
    except Exception as e:  # no zoo extra: report PSNR only
        print(f"no {top5} for the top-5 check: {e}", file=sys.stderr)
    pres = {d: preprocessor(d, sp) for d in decoders}
    out = np.empty(sp.input_shape, np.float32)
    summary, per_image = [], []
    for cls in classes:
        files = sorted((DATA / "images" / cls).glob("*.jpg"))
        datas = [f.read_bytes() for f in files]
        refs = [naive(d, sp).astype(np.float64) for d in datas]
        ref_top5 = [_top5(rt, r) if rt else None for r in refs]
        sizes, fid = {}, {}
        for d, pre in pres.items():
            for i, data in enumerate(datas):
                meta = pre.run(data, out)
                sizes[d, i] = meta.decoded_size
                mse = float(np.mean((out.astype(np.float64) - refs[i]) ** 2))
                fid[d, i] = (
                    float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse),
                    _top5(rt, out) == ref_top5[i] if rt else None,
                )
        cpu: dict = {}
        stages: dict = {}
        variants = [(d, what) for d in decoders for what in ("cvserve", "floor")]
        for rep in range(rounds):
            for i, data in enumerate(datas):
                for d, what in variant_order(variants, rep + i, rotate=True):
                    if what == "floor":
                        c0 = time.process_time()
                        decode_floor(data, sizes[d, i])
                        dt = time.process_time() - c0
                    else:
                        c0 = time.process_time()
                        meta = pres[d].run(data, out)
                        dt = time.process_time() - c0
                        stages.setdefault((d, i), []).append(meta.stages)
                    cpu.setdefault((d, what, i), []).append(dt * 1000)
        for d in decoders:
            rows = []
            for i, f in enumerate(files):
                cv = statistics.median(cpu[d, "cvserve", i])
                fl = statistics.median(cpu[d, "floor", i])
                ratio = statistics.median(
                    a / b for a, b in zip(cpu[d, "cvserve", i], cpu[d, "floor", i], strict=True)
                )
                st = {k: 1000 * statistics.median(s[k] for s in stages[d, i])
                      for k in ("decode", "resize", "normalize")}  # fmt: skip
                rows.append({
                    "image": f"{cls}/{f.name}", "decoder": d, "decoded_size": sizes[d, i],
                    "cpu_ms": cv, "floor_ms": fl, "x_floor": ratio, "stages_wall_ms": st,
                    "psnr_db": fid[d, i][0], "top5_same": fid[d, i][1],
                })  # fmt: skip
            per_image += rows
            cv = statistics.mean(r["cpu_ms"] for r in rows)
            fl = statistics.mean(r["floor_ms"] for r in rows)
            top5 = [r["top5_same"] for r in rows if r["top5_same"] is not None]
            summary.append({
                "class": cls, "decoder": d, "images": len(rows),
                "cpu_ms_per_image": cv, "floor_ms": fl, "x_floor": cv / fl,
                "max_image_x_floor": max(r["x_floor"] for r in rows),
                "stages_wall_ms": {k: statistics.mean(r["stages_wall_ms"][k] for r in rows)
                                   for k in ("decode", "resize", "normalize")},
                "min_psnr_db": min(r["psnr_db"] for r in rows),
                "median_psnr_db": statistics.median(r["psnr_db"] for r in rows),
                "top5_same": f"{sum(top5)}/{len(top5)}" if top5 else None,
            })  # fmt: skip
            print(
                f"{cls:6s} {d:12s} cvserve {cv:6.2f} ms  floor {fl:6.2f} ms  x{cv / fl:5.2f}  "
                f"min PSNR {summary[-1]['min_psnr_db']:5.1f} dB  top-5 {summary[-1]['top5_same']}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    return {"summary": summary, "images": per_image}


def print_floor(floor: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="cvserve against the decode floor (process CPU, one thread, medians)")
    for col in ("class", "decoder", "cvserve ms", "decode/resize/normalize (wall)",
                "floor ms", "x floor", "worst image x", "min PSNR", "top-5 same"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("class", "decoder") else "right")
    for s in floor["summary"]:
        st = s["stages_wall_ms"]
        t.add_row(
            s["class"], s["decoder"], f"{s['cpu_ms_per_image']:.2f}",
            f"{st['decode']:.2f} / {st['resize']:.2f} / {st['normalize']:.2f}",
            f"{s['floor_ms']:.2f}", f"{s['x_floor']:.2f}", f"{s['max_image_x_floor']:.2f}",
            f"{s['min_psnr_db']:.1f}", str(s["top5_same"]),
        )  # fmt: skip
    Console(width=170).print(t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--classes", default=",".join(CLASSES))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--seconds", type=float, default=3.0, help="measured time per cell")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--rounds", type=int, default=15, help="rounds of the floor comparison")
    p.add_argument("--decoders", default=",".join(DECODERS), help="decoders the floor compares")
    p.add_argument("--floor-only", action="store_true", help="only the floor comparison")
    p.add_argument("--top5-model", default="resnet50",
                   help="model whose top-5 the floor comparison checks ('' for none)")  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results" / "preprocess.json"))
    p.add_argument("--child", nargs=4, metavar=("PATH", "CLASS", "THREADS", "SECONDS"),
                   help=argparse.SUPPRESS)  # fmt: skip
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]), float(a.child[3]))))
        return 0

    from rich.console import Console
    from rich.table import Table

    from cvserve.bench.results import write_benchmark

    classes = a.classes.split(",")
    decoders = available(a.decoders.split(","))
    config = {k: v for k, v in vars(a).items() if k != "child"}
    if a.floor_only:
        floor = floor_report(decoders, classes, a.rounds, a.cache_dir, a.top5_model)
        print_floor(floor)
        out = write_benchmark(a.out, "preprocess", config, floor=floor)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    paths = available(a.paths.split(","))
    threads = [int(t) for t in a.threads.split(",")]
    runs = []
    from _interleave import variant_order  # beside this script

    for rep in range(a.repeats):
        for cls in classes:
            for th in threads:
                order = variant_order(paths, rep)
                for path in order:
                    r = subprocess.run(
                        [sys.executable, __file__, "--child", path, cls, str(th), str(a.seconds)],
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                    row["repeat"] = rep
                    runs.append(row)
                    print(
                        f"rep {rep} {cls:6s} t={th} {path:15s} {row['images_per_s']:7.1f} img/s "
                        f"{row['cpu_ms_per_image']:6.2f} cpu-ms/img {row['peak_rss_mb']:6.0f} MB",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip

    summary = []
    for cls in classes:
        for th in threads:
            base = [r for r in runs if (r["path"], r["class"], r["threads"]) == ("naive", cls, th)]
            for path in paths:
                sel = [r for r in runs if (r["path"], r["class"], r["threads"]) == (path, cls, th)]
                ratios = [
                    r["images_per_s"] / b["images_per_s"]
                    for r in sel for b in base if b["repeat"] == r["repeat"]
                ]  # fmt: skip
                summary.append({
                    "class": cls, "threads": th, "path": path,
                    "images_per_s": statistics.median(r["images_per_s"] for r in sel),
                    "images_per_s_range": [min(r["images_per_s"] for r in sel),
                                           max(r["images_per_s"] for r in sel)],
                    "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in sel),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in sel),
                    "x_naive": statistics.median(ratios) if ratios else None,
                })  # fmt: skip
    for s in summary:  # thread scaling: 2 threads against 1, same path and class
        one = [
            x
            for x in summary
            if (x["class"], x["path"], x["threads"]) == (s["class"], s["path"], 1)
        ]
        s["x_one_thread"] = s["images_per_s"] / one[0]["images_per_s"] if one else None

    fid = fidelity(paths, a.cache_dir)

    console = Console()
    t = Table(title="preprocessing: median of repeats (x naive = median per-repeat ratio)")
    for col in (
        "class",
        "threads",
        "path",
        "img/s",
        "x naive",
        "x 1 thread",
        "cpu ms/img",
        "peak MB",
    ):
        t.add_column(col, justify="left" if col in ("class", "path") else "right")
    for s in summary:
        t.add_row(
            s["class"], str(s["threads"]), s["path"], f"{s['images_per_s']:.1f}",
            f"{s['x_naive']:.2f}", f"{s['x_one_thread']:.2f}", f"{s['cpu_ms_per_image']:.2f}",
            f"{s['peak_rss_mb']:.0f}",
        )  # fmt: skip
    console.print(t)
    f = Table(title="fidelity against the naive float64 path, every shared photo (resnet18)")
    for col in ("path", "min PSNR dB", "median PSNR", "max |err|", "min cos", "min cos (centred)",
                "top-1 agree", "top-5 overlap"):  # fmt: skip
        f.add_column(col, justify="left" if col == "path" else "right")
    for path, v in fid.items():
        f.add_row(
            path, f"{v['min_psnr_db']:.1f}", f"{v['median_psnr_db']:.1f}", f"{v['max_abs']:.3f}",
            f"{v['min_cosine']:.5f}", f"{v['min_cosine_centred']:.4f}",
            f"{v['top1_agreement']:.2f}", f"{v['mean_top5_overlap']:.2f}",
        )  # fmt: skip
    console.print(f)
    floor = floor_report(decoders, classes, a.rounds, a.cache_dir, a.top5_model)
    print_floor(floor)
    out = write_benchmark(
        a.out, "preprocess", config, summary=summary, fidelity=fid, floor=floor, runs=runs
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

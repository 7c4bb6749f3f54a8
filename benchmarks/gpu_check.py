"""The measurements of the GPU check (issue 25), run by ``benchmarks/gpu_check.sh`` after it
has checked the machine, installed cvserve and built the models: one JSON with

* ``dnn_alone``: the torch runtime on one preallocated batch, batch 1..256, per model and
  runtime variant (fp32; fp16 autocast + CUDA graphs + channels-last on a GPU): images/s,
  batch ms, ``h2d``/``infer``/``d2h`` (CUDA events) and host CPU ms per image;
* ``end_to_end``: ``cvserve serve --runtime torch`` in a child process, closed loop at each
  concurrency, per model x photo size x preprocessing path (cpu; gpu on a GPU): req/s,
  p50/p99, mean batch, the server's CPU ms per image, the stage breakdown;
* ``one_request``: the Server-Timing stages of one medium photo, alone, per model and path;
* ``goals``: end to end / DNN alone (best throughput), resnet50, medium photos, GPU
  preprocessing: the issue asks >= 0.8.

``--device cpu`` is the dry run of the same code with no GPU (no GPU preprocessing).

    python benchmarks/gpu_check.py --device cuda --cache DIR --photos DIR --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from cvserve.bench import BenchConfig, run_bench
from cvserve.machine import machine_info
from cvserve.models import store
from cvserve.models.pt2 import graph_path
from cvserve.runtime.torchrt import TorchOptions, TorchRuntime, import_torch
from cvserve.serving.process import ServerProcess
from cvserve.trace import parse_server_timing


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda[:N], or cpu for the dry run")
    p.add_argument("--models", default="resnet50,vit-base")
    p.add_argument("--sizes", default="medium,large", help="photo folders under --photos")
    p.add_argument("--photos", required=True, help="a folder with medium/ and large/ photos")
    p.add_argument("--cache", required=True, help="the model store (built, with .pt2)")
    p.add_argument("--batches", type=_ints, default=_ints("1,2,4,8,16,32,64,128,256"))
    p.add_argument("--concurrency", type=_ints, default=_ints("1,4,16,64,256"))
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--dnn-seconds", type=float, default=1.0, help="measured per batch size")
    p.add_argument("--duration", type=float, default=2.0, help="measured per e2e point (s)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up per e2e point (s)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(f"[gpu_check.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _variants(device: str) -> dict[str, dict]:
    """Runtime variants: the plain program, and on a GPU the fast settings."""
    if device == "cpu":
        return {"fp32": {}}
    return {"fp32": {}, "fp16-graphs": {"precision": "fp16", "cuda_graphs": True,
                                         "channels_last": True}}  # fmt: skip


def _flags(opts: dict) -> list[str]:
    out = []
    if opts.get("precision"):
        out += ["--precision", opts["precision"]]
    for key in ("cuda_graphs", "channels_last"):
        if opts.get(key):
            out.append("--" + key.replace("_", "-"))
    return out


# --- DNN alone ---------------------------------------------------------------------------------
def dnn_alone(a: argparse.Namespace, model: str, opts: dict) -> dict:
    meta = store.load_meta(model, a.cache)
    path = graph_path(meta, store.model_dir(model, a.cache), "torch")
    top = max(a.batches)
    rt = TorchRuntime(path, TorchOptions(device=a.device, **opts), max_batch=top)
    row = np.random.default_rng(0).random(meta.preprocess.input_shape, dtype=np.float32)
    buf = np.broadcast_to(row, (top, *row.shape)).astype(rt.input_dtype)
    points = {}
    for b in a.batches:
        for _ in range(2):
            rt.run(buf[:b])
        times, stages = [], []
        c0 = time.process_time()
        end = time.perf_counter() + a.dnn_seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            rt.run(buf[:b])
            times.append(time.perf_counter() - t0)
            stages.append(rt.last_stages or {})
        cpu = time.process_time() - c0
        med = statistics.median(times)
        points[str(b)] = {
            "batch_ms": round(med * 1e3, 3), "images_per_s": round(b / med, 1), "runs": len(times),
            "host_cpu_ms_per_image": round(cpu / (len(times) * b) * 1e3, 3),
            **{f"{k}_ms": round(statistics.median(s.get(k, 0.0) for s in stages) * 1e3, 3)
               for k in ("h2d", "infer", "d2h") if any(k in s for s in stages)},
        }  # fmt: skip
        _say(f"dnn {model} {opts or 'fp32'} b={b}: {b / med:.0f} img/s, {med * 1e3:.2f} ms")
    return {"runtime": rt.describe(), "points": points}


# --- end to end --------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def end_to_end(a: argparse.Namespace, model: str, pre: str, opts: dict) -> tuple[dict, dict]:
    args = ["--model", model, "--runtime", "torch", "--device", a.device, "--cache-dir", a.cache,
            "--max-batch-size", str(a.max_batch), "--max-delay-ms", "2", "--max-queue", "1024",
            *_flags(opts)]  # fmt: skip
    if pre != "cpu":
        args += ["--preprocess", pre]
    out, one = {}, {}
    srv = ServerProcess(args).start(timeout=300)
    try:
        pid = srv.proc.pid
        for size in a.sizes:
            images = Path(a.photos) / size
            points = []
            for c in a.concurrency:
                c0 = _cpu_s(pid)
                res = run_bench(BenchConfig(url=srv.url, model=model, images=str(images),
                                            concurrency=[c], duration=a.duration,
                                            warmup=a.warmup, timeout=120))  # fmt: skip
                cpu = _cpu_s(pid) - c0
                pt = res.points[0]
                total = max(1, pt.ok) * (pt.measure_s + a.warmup) / max(pt.measure_s, 1e-9)
                points.append({
                    "concurrency": c, "req_per_s": round(pt.throughput_rps, 2),
                    "p50_ms": pt.latency_ms.get("p50"), "p99_ms": pt.latency_ms.get("p99"),
                    "errors": pt.errors.get("total", 0), "mean_batch": pt.mean_batch_size,
                    # the server's CPU over warm-up + measure, per image it answered then
                    "server_cpu_ms_per_image": round(cpu / total * 1e3, 3),
                    "breakdown_ms": {k: round(v, 3) for k, v in pt.breakdown_ms.items()},
                })  # fmt: skip
                _say(f"e2e {model} {size} pre={pre} c={c}: {pt.throughput_rps:.1f} req/s, "
                     f"p50 {pt.latency_ms.get('p50')} ms")  # fmt: skip
            out[size] = points
            if size == "medium" or len(one) == 0:
                photos = sorted(images.glob("*.jpg"))
                photo = next((x for x in photos if x.name == "demo01.jpg"), photos[0])
                with httpx.Client(base_url=srv.url, timeout=120) as client:
                    for _ in range(3):  # the last of three, alone: warm
                        r = client.post(f"/v1/models/{model}:predict", content=photo.read_bytes())
                stages, _ = parse_server_timing(r.headers.get("server-timing"))
                one = {"photo": f"{size}/{photo.name}", "status": r.status_code,
                       "stages_ms": {k: round(v * 1e3, 3) for k, v in stages.items()}}  # fmt: skip
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            one["runtime"] = client.get(f"/v1/models/{model}").json().get("runtime")
    finally:
        srv.stop()
    return out, one


def _best(points: list[dict]) -> float:
    return max((p["req_per_s"] for p in points), default=0.0)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.sizes = [s for s in a.sizes.split(",") if s]
    gpu = a.device != "cpu"
    doc: dict = {"schema": "cvserve.gpu_check/2", "device": a.device, "machine": machine_info(),
                 "settings": {k: v for k, v in vars(a).items() if k != "out"},
                 "dnn_alone": {}, "end_to_end": {}, "one_request": {}, "skipped": []}  # fmt: skip
    try:
        torch = import_torch()  # as the runtime imports it (its OpenMP threads passive)
        doc["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "gpu": torch.cuda.get_device_name() if gpu else None}  # fmt: skip
    except Exception as e:  # pragma: no cover - gpu_check.sh checked it
        doc["torch"] = {"error": str(e)}
    t0 = time.perf_counter()
    variants = _variants(a.device)
    for model in a.models:
        for vname, opts in variants.items():
            doc["dnn_alone"][f"{model}/{vname}"] = dnn_alone(a, model, opts)
    doc["seconds_dnn_alone"] = round(time.perf_counter() - t0, 1)
    fast = list(variants)[-1]  # end to end with the fastest variant
    for model in a.models:
        for pre in ("cpu", "gpu"):
            if pre == "gpu" and not gpu:
                doc["skipped"].append(f"{model}: --preprocess gpu needs --device cuda")
                continue
            key = f"{model}/{fast}/pre-{pre}"
            doc["end_to_end"][key], doc["one_request"][key] = end_to_end(
                a, model, pre, variants[fast]
            )
    doc["seconds_total"] = round(time.perf_counter() - t0, 1)
    goals = {}
    for model in a.models:
        dnn = doc["dnn_alone"].get(f"{model}/{fast}", {}).get("points", {})
        dnn_best = max((p["images_per_s"] for p in dnn.values()), default=0.0)
        for pre in ("cpu", "gpu"):
            e2e = doc["end_to_end"].get(f"{model}/{fast}/pre-{pre}", {}).get("medium")
            if e2e and dnn_best:
                goals[f"{model}/medium/pre-{pre}"] = {
                    "e2e_best_req_per_s": _best(e2e), "dnn_best_images_per_s": dnn_best,
                    "ratio": round(_best(e2e) / dnn_best, 3),
                    "goal": ">= 0.8 (resnet50, GPU preprocessing)" if pre == "gpu" else None,
                }  # fmt: skip
    doc["goals"] = goals
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1, default=str))
    _say(f"wrote {a.out} in {doc['seconds_total']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

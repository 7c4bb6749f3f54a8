"""Where a YOLO request's time goes: the Server-Timing stages of an Ultralytics YOLO11n
export (random weights, built offline by ``cvserve.models.yolo``) served by cvserve,
one request at a time on a medium shared photo (and the other tasks' heads beside it).

    python benchmarks/yolo_stages.py                  # 20 requests per photo and task
    python benchmarks/yolo_stages.py --requests 5

Needs the zoo extra and ultralytics (``pip install --no-deps 'ultralytics==8.4.190'``) to
build the models. Writes ``benchmarks/results/yolo_stages.json`` (``--out``): per task and
photo, the median of each stage (ms) and of the wall time at the client, with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = ("images/medium/demo01.jpg", "images/small/dog.jpg")
ARCHS = {"yolo11n": "yolo_detect", "yolo11n-seg": "yolo_segment", "yolo11n-pose": "yolo_pose"}
CALIBRATION = ("images/small/person.jpg", "images/small/giraffe.jpg", "images/medium/kite.jpg",
               "images/medium/truck.jpg")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "yolo_stages.json"))
    args = p.parse_args(argv)

    import httpx

    from cvserve.config import ModelConfig, ServerConfig
    from cvserve.machine import machine_info
    from cvserve.models import store, yolo
    from cvserve.serving.process import ServerThread, free_port
    from cvserve.trace import parse_server_timing

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for arch in ARCHS:
            f = yolo.build(arch, Path(tmp) / f"{arch}.onnx", photos=[DATA / c for c in CALIBRATION])
            store.add_model(f, name=arch, cache=cache)
        cfg = ServerConfig(port=free_port(), cache_dir=str(cache),
                           models=tuple(ModelConfig(a) for a in ARCHS))  # fmt: skip
        with ServerThread(cfg) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
            for arch, task in ARCHS.items():
                for photo in PHOTOS:
                    data = (DATA / photo).read_bytes()
                    stages: dict[str, list[float]] = {}
                    walls, n_det = [], 0
                    for i in range(args.requests + 2):  # two warm-up requests
                        t0 = time.perf_counter()
                        r = c.post(f"/v1/models/{arch}:predict", content=data)
                        wall = (time.perf_counter() - t0) * 1e3
                        r.raise_for_status()
                        if i < 2:
                            continue
                        walls.append(wall)
                        n_det = len(r.json()["detections"])
                        for k, v in parse_server_timing(r.headers["server-timing"])[0].items():
                            stages.setdefault(k, []).append(v * 1e3)
                    row = {
                        "model": arch,
                        "task": task,
                        "photo": photo,
                        "detections": n_det,
                        "requests": args.requests,
                        "wall_ms": statistics.median(walls),
                        "stages_ms": {k: statistics.median(v) for k, v in stages.items()},
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    out = {
        "what": "Server-Timing stages (median ms) of one request at a time, YOLO11n exports "
        "(random weights, BatchNorm recalibrated), CPU onnxruntime; the machine was shared "
        "with other jobs (busy)",
        "command": "python benchmarks/yolo_stages.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a dense answer costs to compute and to send: one 2048x1362 photo (demo01), one
request at a time, per task model and encoding (JSON with PNG arrays, or npz).

Each model is served by ``cvserve serve`` in a child process; the first request of each
encoding warms up, the next ``--requests`` are timed from their ``Server-Timing``
(medians). Response sizes are the bytes on the wire.

    python benchmarks/task_answers.py
    python benchmarks/task_answers.py --models segformer-b0 --requests 3

Writes ``benchmarks/results/task_answers.json`` (``--out``) and prints the README's table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTO = HERE.parent.parent / "shared" / "data" / "images" / "medium" / "demo01.jpg"
ENCODINGS = {
    "segformer-b0": (None, "application/x-npz"),
    "rtdetr-r18": (None,),
    "depth-anything-small": (None, "application/x-npz"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS))
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--requests", type=int, default=5, help="timed requests per encoding")
    p.add_argument("--out", type=Path, default=HERE / "results" / "task_answers.json")
    a = p.parse_args(argv)

    import httpx

    from cvserve.bench.results import write_benchmark
    from cvserve.serving.process import ServerProcess
    from cvserve.trace import parse_server_timing

    data = a.photo.read_bytes()
    rows = []
    print("| model | encoding | response | encode ms | postprocess ms | infer ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in a.models:
        with ServerProcess(["--model", model]) as srv:
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                for accept in ENCODINGS[model]:
                    headers = {"content-type": "image/jpeg"}
                    if accept:
                        headers["accept"] = accept
                    timed, size = [], 0
                    for i in range(a.requests + 1):
                        r = client.post(
                            f"/v1/models/{model}:predict", content=data, headers=headers
                        )
                        r.raise_for_status()
                        stages, _ = parse_server_timing(r.headers["server-timing"])
                        size = len(r.content)
                        if i:  # the first one warms up
                            timed.append(stages)

                    def ms(stage: str, timed=timed) -> float:
                        return 1e3 * statistics.median(s.get(stage, 0.0) for s in timed)

                    row = {
                        "model": model,
                        "encoding": "npz" if accept else "json",
                        "response_bytes": size,
                        **{f"{k}_ms": ms(k) for k in ("encode", "postprocess", "infer")},
                    }
                    rows.append(row)
                    print(
                        f"| {model} | {'npz' if accept else 'JSON'} | {size / 1024:.1f} KB | "
                        f"{row['encode_ms']:.1f} | {row['postprocess_ms']:.1f} | "
                        f"{row['infer_ms']:.1f} |"
                    )
    write_benchmark(a.out, "task_answers", a, photo=a.photo.name, rows=rows)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What reading a ``/v1`` body costs on the server's CPU before decoding: raw image bytes,
a multipart form (``curl -F``) and JSON with a base64 image (``{"image": ...}``), per MiB
of image, with ``cvserve.serving.v1_body.parse_body`` on the same photos.

The forms are interleaved within each repeat (``_interleave.variant_order``), timed with
``time.process_time`` (CPU, not wall: the machine may be busy); medians and spread over
the repeats. It says whether a body form is worth parsing off the event loop (v1.py
parses bodies over 1 MiB in a thread).

    python benchmarks/v1_body.py                  # the large shared photos, 9 repeats
    python benchmarks/v1_body.py --repeats 3

Writes ``benchmarks/results/v1_body.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _interleave import median_range, variant_order  # noqa: E402

from cvserve.bench.results import write_benchmark  # noqa: E402
from cvserve.serving.v1_body import parse_body  # noqa: E402

HERE = Path(__file__).resolve().parent
BOUNDARY = b"cvserveBoundary7MA4YWxk"


def bodies(photo: bytes) -> dict[str, tuple[str, bytes]]:
    form = (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; '
        b'filename="photo.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + photo
        + b"\r\n--" + BOUNDARY + b"--\r\n"
    )  # fmt: skip
    return {
        "raw bytes": ("image/jpeg", photo),
        "multipart form": (f"multipart/form-data; boundary={BOUNDARY.decode()}", form),
        "base64 JSON": ("application/json", json.dumps({"image": base64.b64encode(photo).decode()}).encode()),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(HERE.parent.parent / "shared/data/images/large"),
                   help="folder of photos (default: the shared large photos)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=9, help="interleaved repeats (default 9)")
    p.add_argument("--loops", type=int, default=20, help="parses per timing (default 20)")
    p.add_argument("--out", default=str(HERE / "results" / "v1_body.json"),
                   help="result JSON (default benchmarks/results/v1_body.json)")  # fmt: skip
    a = p.parse_args()
    photos = [f.read_bytes() for f in sorted(Path(a.images).glob("*.jpg"))]
    if not photos:
        p.error(f"no .jpg in {a.images}")
    cases = {name: [bodies(ph)[name] for ph in photos] for name in bodies(b"x")}
    mib = sum(len(ph) for ph in photos) / 2**20
    per_mib: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(a.repeats):
        for name in variant_order(list(cases), rep, rotate=True):
            t0 = time.process_time()
            for _ in range(a.loops):
                for ctype, body in cases[name]:
                    parse_body(ctype, body)
            per_mib[name].append((time.process_time() - t0) * 1000 / a.loops / mib)
    print(f"{len(photos)} photos, {mib:.2f} MiB; CPU ms per MiB of image, median [min-max]")
    for name, vals in per_mib.items():
        print(f"  {name:15s} {median_range(vals)}")
    summary = {n: {"median_ms_per_mib": statistics.median(v), "min": min(v), "max": max(v)}
               for n, v in per_mib.items()}  # fmt: skip
    path = write_benchmark(a.out, "v1_body", a, photos=len(photos), mib=mib, summary=summary,
                           repeats=per_mib)  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What each wire protocol costs: /v1, KServe v2 over HTTP (JSON and binary tensors) and
v2 over gRPC, against ONE cvserve server, on a model too small to matter.

One ``cvserve serve --model tiny-resnet --grpc-port P`` child process serves every
variant; `cvserve bench` loads it at one concurrency (closed loop), the variants
interleaved within each repeat (their order rotates from repeat to repeat). Variants:

- ``v1 image``: ``POST /v1/models/m:predict`` with a PNG of the model's own size
  (36x36, cut from a real photo), so decoding it is negligible (~0.1 ms) but not free;
- ``v2-http/v2-grpc image``: the same PNG as a BYTES input (same server work as v1);
- ``v2-http JSON``, ``v2-http binary``, ``v2-grpc raw``: the model's own FP32 input
  tensor (3x32x32, the PNG preprocessed once by the bench), as JSON ``data``, in the
  binary tensor extension, in ``raw_input_contents``: no decoding on the server at all.

Reported per variant: median req/s over repeats [min-max], its ratio to v1 in the same
repeat, p50/p99 latency, and the CPU time per request of the client and of the server
process (whole runs, warm-up included; the machine is shared, so CPU per request says
more than req/s about what a protocol costs), plus the stage breakdown from
Server-Timing (``network`` = client latency minus the server's stages: framing, the
HTTP or gRPC stack on both sides, and the client itself).

Optional (``--photos``): the encoded-image path on real photos (``medium``, resnet18) for
v1 vs v2-http vs v2-grpc at ``--photo-concurrency``, in a second server process.

    python benchmarks/protocols.py                                    # ~6 minutes
    python benchmarks/protocols.py --repeats 3 --duration 5 --warmup 1
    python benchmarks/protocols.py --photos --photo-concurrency 1,16

Writes ``benchmarks/results/protocols.json`` (``--out``) and prints the tables.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from PIL import Image
from rich.console import Console

from cvserve.bench import BenchConfig, BenchImage, run_bench
from cvserve.bench.console import fit_table
from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
MODEL = "tiny-resnet"

#: name -> (protocol, payload, BenchConfig extras)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "v1 image": ("v1", "PNG body", {}),
    "v2-http image": ("v2-http", "PNG BYTES", {}),
    "v2-grpc image": ("v2-grpc", "PNG BYTES", {}),
    "v2-http JSON": ("v2-http", "FP32 JSON", {"input_tensor": True, "json_tensors": True}),
    "v2-http binary": ("v2-http", "FP32 bin", {"input_tensor": True}),
    "v2-grpc raw": ("v2-grpc", "FP32 raw", {"input_tensor": True}),
}
STAGE_GROUPS = {
    "recv": ("recv",),
    "wait": ("queue", "batch_wait"),
    "prep": ("decode", "resize", "normalize"),
    "infer": ("infer",),
    "post+enc": ("postprocess", "encode"),
    "network": ("network",),
}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_sized_png(cache: str | None) -> BenchImage:
    """A real photo cut to the model's resize size (shortest edge), as PNG."""
    spec = store.load_meta(MODEL, cache).preprocess
    side = spec.resize_shortest or max(spec.height, spec.width)
    photo = Image.open(DATA / "images" / "small" / "dog.jpg").convert("RGB")
    w, h = photo.size
    s = min(w, h)
    photo = photo.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
    buf = io.BytesIO()
    photo.resize((side, side), Image.Resampling.BICUBIC).save(buf, "PNG")
    return BenchImage(f"dog-{side}x{side}.png", buf.getvalue(), "image/png")


def start_server(model: str, serve_args: list[str], cache: str | None) -> tuple:
    grpc_port = free_port()
    args = ["--model", model, "--grpc-port", str(grpc_port), *serve_args]
    if cache:
        args += ["--cache-dir", cache]
    return ServerProcess(args), f"127.0.0.1:{grpc_port}"  # started by `with`


def measure(srv, grpc_target, model, images, protocol, extra, conc, a) -> tuple:
    """One bench run; returns its points and the client's and server's CPU per request."""
    config = BenchConfig(
        url=srv.url, model=model, images=images, concurrency=conc, duration=a.duration,
        warmup=a.warmup, protocol=protocol,
        grpc_target=grpc_target if protocol == "v2-grpc" else None, **extra,
    )  # fmt: skip
    server0, client0 = _cpu_seconds(srv.proc.pid), time.process_time()
    result = run_bench(config)
    client = time.process_time() - client0
    server = _cpu_seconds(srv.proc.pid) - server0
    done = max(1, len(result.rows.get("latency", ())))  # every finished request, warm-up too
    return result.points, client / done * 1e6, server / done * 1e6


def _group(breakdown: dict[str, float]) -> dict[str, float]:
    return {g: sum(breakdown.get(s, 0.0) for s in stages) for g, stages in STAGE_GROUPS.items()}


def _summary(rows: list[dict], keys: tuple, base: dict) -> dict:
    """Medians and spread of ``rows`` (one per repeat); ratios to ``base``'s same repeat."""
    tput = [r["throughput_rps"] for r in rows]
    ratios = [
        r["throughput_rps"] / base[r["repeat"]]
        for r in rows
        if base.get(r["repeat"])  # the baseline of the same repeat
    ]
    med = statistics.median
    return {
        **dict(keys),
        "repeats": len(rows),
        "throughput_rps_median": med(tput),
        "throughput_rps_range": [min(tput), max(tput)],
        "ratio_to_v1_median": med(ratios) if ratios else None,
        "ratio_to_v1_range": [min(ratios), max(ratios)] if ratios else None,
        "p50_ms_median": med([r["latency_ms"]["p50"] for r in rows]),
        "p99_ms_median": med([r["latency_ms"]["p99"] for r in rows]),
        "client_us_per_request_median": med([r["client_us"] for r in rows]),
        "server_us_per_request_median": med([r["server_us"] for r in rows]),
        "errors": sum(r["errors"] for r in rows),
        "breakdown_ms_median": {
            g: med([_group(r["breakdown_ms"])[g] for r in rows]) for g in STAGE_GROUPS
        },
    }


def _log(rep: int, name: str, c: int, pt, client_us: float, server_us: float) -> None:
    print(
        f"rep {rep} {name:15s} c={c:<3d} {pt.throughput_rps:7.1f} req/s "
        f"p50 {pt.latency_ms['p50'] or 0:6.2f} ms  client {client_us:5.0f} us/req  "
        f"server {server_us:5.0f} us/req  errors {pt.errors['total']}",
        file=sys.stderr,
        flush=True,
    )


def overhead(a, serve_args: list[str]) -> tuple[list[dict], list[dict], BenchImage]:
    from _interleave import variant_order  # beside this script

    image = model_sized_png(a.cache_dir)
    names = [n for n in VARIANTS if n in a.variants]
    runs: list[dict] = []
    srv, grpc_target = start_server(MODEL, serve_args, a.cache_dir)
    with srv:
        for rep in range(a.repeats):
            for name in variant_order(names, rep, rotate=True):
                protocol, payload, extra = VARIANTS[name]
                (pt,), client_us, server_us = measure(
                    srv, grpc_target, MODEL, [image], protocol, extra, [a.concurrency], a
                )
                _log(rep, name, a.concurrency, pt, client_us, server_us)
                runs.append({
                    "repeat": rep, "variant": name, "protocol": protocol, "payload": payload,
                    "concurrency": a.concurrency, "throughput_rps": pt.throughput_rps,
                    "latency_ms": pt.latency_ms, "errors": pt.errors["total"],
                    "client_us": client_us, "server_us": server_us,
                    "mean_batch_size": pt.mean_batch_size,
                    "mean_response_bytes": pt.mean_response_bytes,
                    "breakdown_ms": pt.breakdown_ms,
                })  # fmt: skip
    base = {r["repeat"]: r["throughput_rps"] for r in runs if r["variant"] == "v1 image"}
    summary = [
        _summary(
            [r for r in runs if r["variant"] == name],
            (("variant", name), ("protocol", VARIANTS[name][0]), ("payload", VARIANTS[name][1])),
            base,
        )
        for name in names
    ]
    return runs, summary, image


def photos(a, serve_args: list[str]) -> tuple[list[dict], list[dict]]:
    from _interleave import variant_order  # beside this script

    conc = [int(c) for c in a.photo_concurrency.split(",")]
    protocols = ["v1", "v2-http", "v2-grpc"]
    store.ensure_built(a.photo_model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    runs: list[dict] = []
    srv, grpc_target = start_server(a.photo_model, serve_args, a.cache_dir)
    with srv:
        for rep in range(a.repeats):
            for protocol in variant_order(protocols, rep, rotate=True):
                points, client_us, server_us = measure(
                    srv, grpc_target, a.photo_model, a.photo_images, protocol, {}, conc, a
                )
                for pt in points:
                    _log(rep, protocol, pt.concurrency, pt, client_us, server_us)
                    runs.append({
                        "repeat": rep, "protocol": protocol, "concurrency": pt.concurrency,
                        "throughput_rps": pt.throughput_rps, "latency_ms": pt.latency_ms,
                        "errors": pt.errors["total"], "client_us": client_us,
                        "server_us": server_us, "breakdown_ms": pt.breakdown_ms,
                    })  # fmt: skip
    summary = []
    for c in conc:
        base = {
            r["repeat"]: r["throughput_rps"]
            for r in runs
            if r["protocol"] == "v1" and r["concurrency"] == c
        }
        for protocol in protocols:
            sel = [r for r in runs if r["protocol"] == protocol and r["concurrency"] == c]
            summary.append(_summary(sel, (("protocol", protocol), ("concurrency", c)), base))
    return runs, summary


def _range(lo_hi: list[float] | None, fmt: str = "{:.0f}") -> str:
    return "-" if lo_hi is None else f"{fmt.format(lo_hi[0])}-{fmt.format(lo_hi[1])}"


def _ratio(s: dict) -> str:
    r = s["ratio_to_v1_median"]
    return "-" if r is None else f"{r:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--serve-args", default="", help="extra `cvserve serve` flags")
    p.add_argument(
        "--photos", action="store_true",
        help="optional: also v1 vs v2-http vs v2-grpc with encoded real photos",
    )  # fmt: skip
    p.add_argument("--photo-model", default="resnet18")
    p.add_argument("--photo-images", default=str(DATA / "images" / "medium"))
    p.add_argument("--photo-concurrency", default="1,16")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(HERE / "results" / "protocols.json"))
    a = p.parse_args()
    a.variants = [v.strip() for v in a.variants.split(",")]
    unknown = set(a.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    serve_args = shlex.split(a.serve_args)
    store.ensure_built(MODEL, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))

    runs, summary, image = overhead(a, serve_args)
    console = Console(width=80)
    console.print(fit_table(
        ["protocol", "payload", "req/s", "range", "x v1", "p50 ms", "p99 ms",
         "cli us", "srv us"],
        [[s["protocol"], s["payload"], s["throughput_rps_median"],
          _range(s["throughput_rps_range"]), _ratio(s), s["p50_ms_median"], s["p99_ms_median"],
          round(s["client_us_per_request_median"]), round(s["server_us_per_request_median"])]
         for s in summary],
        title=f"protocol overhead: {MODEL}, c={a.concurrency}, one server "
              f"(median of {a.repeats}, {a.duration:g} s each)",
        caption=[f"PNG rows send {image.name} ({len(image.data)} bytes; its decode is part "
                 "of prep below); FP32 rows send the 3x32x32 input tensor (12,288 bytes).",
                 "cli/srv us: CPU time per request of the client and of the server process "
                 "(whole runs, warm-up included); both share the cores with other jobs."],
        decimals=2,
    ))  # fmt: skip
    console.print(fit_table(
        ["protocol", "payload", *STAGE_GROUPS],
        [[s["protocol"], s["payload"], *s["breakdown_ms_median"].values()] for s in summary],
        title="where a request's time goes (ms, median of repeats; from Server-Timing)",
        caption="wait = queue + batch_wait; prep = decode + resize + normalize; network = "
                "client latency minus server time",
        decimals=3,
    ))  # fmt: skip

    sections: dict = {"overhead": {"image": {"name": image.name, "bytes": len(image.data)},
                                   "summary": summary, "runs": runs}}  # fmt: skip
    if a.photos:
        photo_runs, photo_summary = photos(a, serve_args)
        console.print(fit_table(
            ["protocol", "c", "req/s", "range", "x v1", "p50 ms", "p99 ms", "prep ms",
             "network ms"],
            [[s["protocol"], s["concurrency"], s["throughput_rps_median"],
              _range(s["throughput_rps_range"], "{:.1f}"), _ratio(s), s["p50_ms_median"],
              s["p99_ms_median"], s["breakdown_ms_median"]["prep"],
              s["breakdown_ms_median"]["network"]] for s in photo_summary],
            title=f"encoded photos ({Path(a.photo_images).name}), {a.photo_model}: "
                  f"median of {a.repeats}",
        ))  # fmt: skip
        sections["photos"] = {"summary": photo_summary, "runs": photo_runs}
    out = write_benchmark(a.out, "protocols", a, **sections)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

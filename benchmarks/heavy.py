"""cvserve against the servers users write for heavy workloads, side by side in one run.

Two workloads, each against its own baseline (``benchmarks/baselines/``, plain FastAPI
servers anyone can rerun):

- ``ocr``: ``cvserve serve --pipeline ocr`` against FastAPI + ``RapidOCR()`` (1.4.4, the
  same PP-OCRv4 models, default settings) in the threadpool, on the shared OCR images;
- ``segment``: ``cvserve serve --model segformer-b0`` against FastAPI + HF
  ``SegformerImageProcessor`` + onnxruntime on the same ONNX file +
  ``post_process_semantic_segmentation`` (torch), on the medium photos.

In each repeat every server is started in its own process (baseline and cvserve
interleaved, their order alternating from repeat to repeat), loaded by ``cvserve bench``
at each concurrency (closed loop), and stopped. Reported: median throughput over the
repeats with its range, its ratio to the baseline measured in the same repeat, p50/p99
latency and the p50 speed ratio (baseline p50 / cvserve p50), and for cvserve the mean
time per request in each stage (from ``Server-Timing``; the baselines send none). In the
first repeat each server also answers every image once, one request at a time: OCR texts
are compared line list to line list (similarity: ``difflib`` ratio of the joined texts;
1.0 = the same lines), segmentation class maps pixel by pixel.

    python benchmarks/heavy.py                               # ~15 minutes on 2 cores
    python benchmarks/heavy.py --duration 20 --repeats 1     # ~7 minutes
    python benchmarks/heavy.py --workloads ocr --ocr-arg=--stage-workers=2
    python benchmarks/heavy.py --cvserve-arg='--max-batch-size 4' --segment-arg=--instances=2

``--cvserve-arg`` (repeatable; each value is split like a shell line) goes to both cvserve
servers, ``--ocr-arg``/``--segment-arg`` to one. The issue's goals (issue 11) are checked
and printed: OCR throughput >= 1.6x the baseline's at c=4 and p50 speed >= 0.8x at c=1,
segmentation throughput >= 3x at c=4, OCR similarity 1.0 on every image.

Writes ``benchmarks/results/heavy.json`` (``--out``) and prints the tables.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.bench import BenchConfig, BenchImage, load_images, run_bench
from cvserve.bench.console import fit_table, fmt_num
from cvserve.bench.results import write_benchmark
from cvserve.serving.process import ServerProcess
from cvserve.trace import STAGES

HERE = Path(__file__).resolve().parent
BASELINES = HERE / "baselines"
DATA = Path(os.environ.get("CVSERVE_DATA") or HERE.parent.parent / "shared" / "data")
SERVERS = ("baseline", "cvserve")
WORKLOADS = ("ocr", "segment")
#: (workload, what, concurrency, target) of the issue's goals; what: "x" throughput ratio,
#: "p50x" p50 speed ratio (baseline p50 / cvserve p50)
GOALS = (("ocr", "x", 4, 1.6), ("ocr", "p50x", 1, 0.8), ("segment", "x", 4, 3.0))
OCR_ROUTE = {"baseline": "/ocr", "cvserve": "/v1/pipelines/ocr:predict"}


@dataclass
class Workload:
    """One comparison: what cvserve serves, how the bench addresses it, the images."""

    name: str
    target: str  # the bench's model or pipeline name
    kind: str  # "model" | "pipeline"
    images: list[BenchImage]
    cvserve_args: list[str]
    baseline_script: str
    baseline_args: list[str] = field(default_factory=list)

    def route(self, server: str) -> str:
        """Where one image is posted for the correctness check."""
        if self.name == "ocr":
            return OCR_ROUTE[server]
        return "/segment" if server == "baseline" else f"/v1/models/{self.target}:predict"


def baseline_process(script: str, args: list[str]) -> ServerProcess:
    """``python benchmarks/baselines/SCRIPT`` on a free port, started and stopped like
    ``cvserve serve`` (``with`` waits for ``/readyz``; stopping sends SIGTERM)."""
    srv = ServerProcess([])
    srv.args = [sys.executable, str(BASELINES / script), "--host", srv.host,
                "--port", str(srv.port), *args]  # fmt: skip
    return srv


def server_process(w: Workload, server: str) -> ServerProcess:
    if server == "baseline":
        return baseline_process(w.baseline_script, w.baseline_args)
    return ServerProcess(w.cvserve_args)


def command_line(srv: ServerProcess) -> str:
    """The server's command as a user would type it (port and host left out)."""
    args = list(srv.args[1:])
    for flag in ("--host", "--port"):
        i = args.index(flag)
        del args[i : i + 2]
    if args[:2] == ["-m", "cvserve"]:
        args = ["cvserve", *args[2:]]
    else:
        args = ["python", os.path.relpath(args[0], HERE.parent), *args[1:]]
    return shlex.join(args)


# --- correctness -------------------------------------------------------------------------
def text_similarity(a: list[str], b: list[str]) -> float:
    """1.0 when both list the same lines; else ``difflib``'s ratio of the joined texts."""
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(None, "\n".join(a), "\n".join(b), autojunk=False).ratio()


def answers(w: Workload, url: str, server: str, timeout: float) -> dict[str, Any]:
    """Every image of ``w`` once, one request at a time: OCR line texts, or class maps."""
    import httpx

    from cvserve.tasks.encode import decode_array

    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for im in w.images:
            r = client.post(w.route(server), content=im.data,
                            headers={"content-type": im.content_type})  # fmt: skip
            r.raise_for_status()
            body = r.json()
            if w.name == "ocr":
                out[im.name] = [line["text"] for line in body["lines"]]
            else:
                out[im.name] = decode_array(body["mask"])
    return out


def compare(w: Workload, got: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The cvserve answers against the baseline's, per image and overall."""
    base, ours = got["baseline"], got["cvserve"]
    per_image = []
    for name in base:
        if w.name == "ocr":
            sim = text_similarity(base[name], ours[name])
            per_image.append({"image": name, "similarity": sim, "baseline": base[name],
                              "cvserve": ours[name]})  # fmt: skip
        else:
            a, b = base[name], ours[name]
            same = a.shape == b.shape
            agree = float(np.mean(a == b)) if same else 0.0
            per_image.append({"image": name, "shape_equal": same, "pixel_agreement": agree,
                              "shape": list(a.shape)})  # fmt: skip
    if w.name == "ocr":
        sims = [r["similarity"] for r in per_image]
        return {"images": len(sims), "min_similarity": min(sims),
                "differ": [r["image"] for r in per_image if r["similarity"] < 1.0],
                "per_image": per_image}  # fmt: skip
    agree = [r["pixel_agreement"] for r in per_image]
    return {"images": len(agree), "min_pixel_agreement": min(agree),
            "median_pixel_agreement": statistics.median(agree),
            "shape_mismatch": [r["image"] for r in per_image if not r["shape_equal"]],
            "per_image": per_image}  # fmt: skip


# --- the run -----------------------------------------------------------------------------
def point_row(rep: int, w: Workload, server: str, pt: Any) -> dict[str, Any]:
    return {
        "repeat": rep, "workload": w.name, "server": server, "concurrency": pt.concurrency,
        "throughput_rps": pt.throughput_rps, "requests": pt.ok, "latency_ms": pt.latency_ms,
        "errors": pt.errors, "mean_batch_size": pt.mean_batch_size,
        "breakdown_ms": pt.breakdown_ms, "breakdown_pct": pt.breakdown_pct,
        "server_timing_missing": pt.server_timing_missing,
    }  # fmt: skip


def measure(a: argparse.Namespace, wls: list[Workload], conc: list[int]) -> dict[str, Any]:
    """Every repeat, workload and server in turn; a server that fails to start or to
    answer is recorded in ``failures`` and the run goes on with the next one."""
    import httpx

    from cvserve.bench import BenchError

    rows: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    commands: dict[str, dict[str, str]] = {}
    failures: list[dict[str, Any]] = []
    from _interleave import variant_order  # beside this script

    for rep in range(a.repeats):
        order = variant_order(SERVERS, rep)
        for w in wls:
            got: dict[str, Any] = {}
            for server in order:
                srv = server_process(w, server)
                commands.setdefault(w.name, {})[server] = command_line(srv)
                say(f"rep {rep} {w.name}: starting {commands[w.name][server]}")
                try:
                    with srv:
                        if rep == 0 and a.check:
                            got[server] = answers(w, srv.url, server, a.timeout)
                        res = run_bench(BenchConfig(
                            url=srv.url, model=w.target, kind=w.kind, images=w.images,
                            concurrency=conc, duration=a.duration, warmup=a.warmup,
                            timeout=a.timeout,
                        ))  # fmt: skip
                except (RuntimeError, TimeoutError, BenchError, httpx.HTTPError) as e:
                    failures.append({"repeat": rep, "workload": w.name, "server": server,
                                     "error": f"{type(e).__name__}: {e}"})  # fmt: skip
                    say(f"rep {rep} {w.name} {server} FAILED: {type(e).__name__}: {e}")
                    continue
                for pt in res.points:
                    rows.append(point_row(rep, w, server, pt))
                    lat = pt.latency_ms
                    say(f"rep {rep} {w.name:7s} {server:8s} c={pt.concurrency:<2d} "
                        f"{pt.throughput_rps:6.2f} req/s  p50 {lat['p50'] or 0:8.1f} ms  "
                        f"p99 {lat['p99'] or 0:8.1f} ms  errors {pt.errors['total']}")  # fmt: skip
            if len(got) == len(SERVERS):
                checks[w.name] = compare(w, got)
    return {"rows": rows, "checks": checks, "commands": commands, "failures": failures}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(rows: list[dict[str, Any]], wls: list[str], conc: list[int]) -> list[dict]:
    """Per workload, server and concurrency: medians over the repeats, ranges, and the
    ratios to the baseline of the same repeat."""

    def sel(w: str, s: str, c: int) -> list[dict[str, Any]]:
        return [r for r in rows if (r["workload"], r["server"], r["concurrency"]) == (w, s, c)]

    out = []
    for w in wls:
        for c in conc:
            base = {r["repeat"]: r for r in sel(w, "baseline", c)}
            for s in SERVERS:
                mine = sel(w, s, c)
                if not mine:  # the server failed in every repeat
                    continue
                tput = [r["throughput_rps"] for r in mine]
                ratio, p50x = [], []
                for r in mine:
                    b = base.get(r["repeat"])
                    if b and b["throughput_rps"]:
                        ratio.append(r["throughput_rps"] / b["throughput_rps"])
                    if b and b["latency_ms"]["p50"] and r["latency_ms"]["p50"]:
                        p50x.append(b["latency_ms"]["p50"] / r["latency_ms"]["p50"])
                stages = sorted({k for r in mine for k in r["breakdown_ms"]}, key=STAGES.index)
                out.append({
                    "workload": w, "server": s, "concurrency": c, "repeats": len(mine),
                    "throughput_rps_median": _median(tput),
                    "throughput_rps_range": [min(tput), max(tput)] if tput else None,
                    "p50_ms_median": _median([r["latency_ms"]["p50"] for r in mine
                                              if r["latency_ms"]["p50"] is not None]),
                    "p99_ms_median": _median([r["latency_ms"]["p99"] for r in mine
                                              if r["latency_ms"]["p99"] is not None]),
                    "mean_ms_median": _median([r["latency_ms"]["mean"] for r in mine
                                               if r["latency_ms"]["mean"] is not None]),
                    "errors": sum(r["errors"]["total"] for r in mine),
                    "x_baseline_median": _median(ratio),
                    "x_baseline_range": [min(ratio), max(ratio)] if ratio else None,
                    "p50_speed_x_median": _median(p50x),
                    "p50_speed_x_range": [min(p50x), max(p50x)] if p50x else None,
                    "breakdown_ms_median": {
                        k: _median([r["breakdown_ms"].get(k, 0.0) for r in mine]) for k in stages
                    },
                    "breakdown_pct_median": {
                        k: _median([r["breakdown_pct"].get(k, 0.0) for r in mine]) for k in stages
                    },
                })  # fmt: skip
    return out


def goals(summary: list[dict[str, Any]], checks: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals that this run measured, each with its number and verdict."""
    out = []
    for w, what, c, target in GOALS:
        s = next((s for s in summary if (s["workload"], s["server"], s["concurrency"])
                  == (w, "cvserve", c)), None)  # fmt: skip
        key = "x_baseline_median" if what == "x" else "p50_speed_x_median"
        value = None if s is None else s[key]
        if value is None:
            continue
        name = "throughput x baseline" if what == "x" else "p50 speed x baseline"
        out.append({"goal": f"{w} {name} at c={c}", "target": target, "measured": value,
                    "met": value >= target})  # fmt: skip
    if "ocr" in checks:
        value = checks["ocr"]["min_similarity"]
        out.append({"goal": "ocr text similarity, min over images", "target": 1.0,
                    "measured": value, "met": value >= 1.0})  # fmt: skip
    return out


# --- printing ----------------------------------------------------------------------------
def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _range(r: list[float] | None, decimals: int = 1) -> str:
    return "-" if not r else f"{r[0]:.{decimals}f}-{r[1]:.{decimals}f}"


def _rps(value: float | None) -> str:
    return fmt_num(value, 2 if value is not None and value < 10 else 1)


def _show(console: Any, title: str, table: Any, notes: list[str] | None = None) -> None:
    """A table with its title and notes as plain lines: fit_table would wrap them at the
    table's own width."""
    console.print(f"\n[bold]{title}[/]")
    console.print(table)
    for note in notes or []:
        console.print(note)


def print_tables(console: Any, summary: list[dict], checks: dict, met: list[dict]) -> None:
    rows = []
    for s in summary:
        base = s["server"] == "baseline"
        rps = s["throughput_rps_median"]
        rows.append([
            s["workload"], s["server"], s["concurrency"], _rps(rps),
            _range(s["throughput_rps_range"], 2 if (rps or 0) < 10 else 1),
            "-" if base else fmt_num(s["x_baseline_median"], 2),
            "-" if base else _range(s["x_baseline_range"], 2),
            fmt_num(s["p50_ms_median"]), fmt_num(s["p99_ms_median"]),
            "-" if base else fmt_num(s["p50_speed_x_median"], 2),
        ])  # fmt: skip
    errors = [f"{s['workload']} {s['server']} c={s['concurrency']}: {s['errors']} errors"
              for s in summary if s["errors"]]  # fmt: skip
    _show(
        console,
        "cvserve against the servers users write (median over repeats)",
        fit_table(("workload", "server", "c", "req/s", "range", "x base", "x range",
                   "p50 ms", "p99 ms", "p50 x"), rows),
        ["x base: throughput / the baseline's in the same repeat; p50 x: the baseline's "
         "p50 / cvserve's (> 1: cvserve answers sooner)", *errors],
    )  # fmt: skip

    ours = [s for s in summary if s["server"] == "cvserve" and s["breakdown_ms_median"]]
    if ours:
        stages = [k for k in STAGES if any(k in s["breakdown_ms_median"] for s in ours)]
        cols = [f"{s['workload']} c={s['concurrency']}" for s in ours]
        body = [[k, *(_stage_cell(s, k) for s in ours)] for k in stages]
        body.append(["mean latency", *(fmt_num(s["mean_ms_median"]) for s in ours)])
        _show(
            console,
            "cvserve: mean ms per request in each stage (share of the mean latency)",
            fit_table(("stage", *cols), body),
        )

    if "ocr" in checks:
        ck = checks["ocr"]
        _show(
            console,
            "OCR answers, one request per image: cvserve against RapidOCR's",
            fit_table(
                ("image", "baseline lines", "cvserve lines", "similarity"),
                [[r["image"], len(r["baseline"]), len(r["cvserve"]), f"{r['similarity']:.4f}"]
                 for r in ck["per_image"]],
            ),
            [f"min similarity {ck['min_similarity']:.4f}; differ: "
             f"{', '.join(ck['differ']) or 'none'}"],
        )  # fmt: skip
    if "segment" in checks:
        ck = checks["segment"]
        _show(
            console,
            "segmentation class maps, one request per image: cvserve against HF's",
            fit_table(
                ("image", "size", "pixels agreeing"),
                [[r["image"], "x".join(map(str, r["shape"][::-1])),
                  f"{r['pixel_agreement']:.4f}"] for r in ck["per_image"]],
            ),
            [f"min agreement {ck['min_pixel_agreement']:.4f}, median "
             f"{ck['median_pixel_agreement']:.4f}; shape mismatches: "
             f"{', '.join(ck['shape_mismatch']) or 'none'}"],
        )  # fmt: skip
    if met:
        _show(
            console,
            "goals (issue 11)",
            fit_table(
                ("goal", "target", "measured", "met"),
                [[g["goal"], f">= {g['target']:g}", f"{g['measured']:.3f}",
                  "yes" if g["met"] else "NO"] for g in met],
            ),
        )  # fmt: skip


def _stage_cell(s: dict[str, Any], k: str) -> str:
    ms = s["breakdown_ms_median"].get(k)
    if ms is None:
        return "-"
    return f"{ms:.1f} ({s['breakdown_pct_median'].get(k, 0.0):.0f}%)"


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("rapidocr-onnxruntime", "fastapi", "starlette", "transformers", "torch",
                 "opencv-python"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def split_args(values: list[str] | None) -> list[str]:
    return [tok for v in values or [] for tok in shlex.split(v)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="ocr,segment")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured per point")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each point")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--model", default="segformer-b0", help="the segmentation zoo model")
    p.add_argument("--ocr-images", default=str(DATA / "ocr"), help="a file or folder")
    p.add_argument("--segment-images", default=str(DATA / "images" / "medium"))
    p.add_argument("--cache-dir", default=None, help="cvserve's model store")
    p.add_argument(
        "--cvserve-arg",
        action="append",
        metavar="ARGS",
        help="extra `cvserve serve` arguments for both workloads (repeatable)",
    )
    p.add_argument(
        "--ocr-arg",
        action="append",
        metavar="ARGS",
        help="extra `cvserve serve` arguments for the OCR pipeline only",
    )
    p.add_argument(
        "--segment-arg",
        action="append",
        metavar="ARGS",
        help="extra `cvserve serve` arguments for segmentation only",
    )
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip sending every image once to compare the answers",
    )
    p.add_argument("--out", default=str(HERE / "results" / "heavy.json"))
    a = p.parse_args(argv)

    names = [w for w in a.workloads.split(",") if w]
    if not names or set(names) - set(WORKLOADS):
        p.error(f"--workloads: pick from {', '.join(WORKLOADS)}")
    conc = [int(c) for c in a.concurrency.split(",")]
    common = split_args(a.cvserve_arg)
    cache = ["--cache-dir", a.cache_dir] if a.cache_dir else []
    wls = []
    if "ocr" in names:
        wls.append(Workload(
            "ocr", "ocr", "pipeline", load_images(a.ocr_images),
            ["--pipeline", "ocr", *cache, *common, *split_args(a.ocr_arg)], "ocr_server.py",
        ))  # fmt: skip
    if "segment" in names:
        from cvserve.models import store

        store.ensure_built(a.model, a.cache_dir, progress=say)
        wls.append(Workload(
            "segment", a.model, "model", load_images(a.segment_images),
            ["--model", a.model, *cache, *common, *split_args(a.segment_arg)],
            "segment_server.py", ["--model", a.model, *cache],
        ))  # fmt: skip

    t0 = time.monotonic()
    load_before = os.getloadavg()
    run = measure(a, wls, conc)
    summary = summarize(run["rows"], names, conc)
    met = goals(summary, run["checks"])

    from rich.console import Console

    print_tables(Console(width=80), summary, run["checks"], met)
    out = write_benchmark(
        a.out, "heavy", a,
        servers=run["commands"], versions=versions(),
        images={w.name: [im.name for im in w.images] for w in wls},
        load_average={"before": load_before, "after": os.getloadavg()},
        seconds=time.monotonic() - t0,
        goals=met, checks=run["checks"], summary=summary, runs=run["rows"],
        failures=run["failures"],
    )  # fmt: skip
    say(f"wrote {out}")
    for f in run["failures"]:
        say(f"failed: rep {f['repeat']} {f['workload']} {f['server']}: {f['error']}")
    return 1 if run["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Deadlines across the broker hop: how much of a slow step's work goes to items whose
request has already been answered (a 504 at its deadline).

A declared pipeline (detector in the server, 4 crops per image, a classifier over the
in-process broker) on the simulated runtime: the classifier takes ``--step-ms`` per item
and one worker serves it, far slower than the open-loop arrivals (``--rate`` requests per
second, 4 items each). Requests have a ``--deadline-ms`` deadline. Two variants,
interleaved: ``deadlines`` (items carry their deadline, a worker drops expired ones, a
timed-out request withdraws its unstarted items) and ``none`` (the same code with the
deadline check and the withdrawal switched off: how stage workers behaved before).

Wasted work (``wasted_work_share``): the worker's time spent on items after their
request's deadline (the request was answered 504 then), as a share of all its time on
items. Also counted: items that finished after the deadline (``wasted_share``: an item
that straddles it is counted whole) and items that started after it. Simulated time burns no CPU, so
the numbers do not depend on how busy the machine is.

    python benchmarks/pipeline_deadlines.py --seconds 12 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _interleave import median_range, variant_order  # noqa: E402

from cvserve.brokers import consumer as consumer_mod  # noqa: E402
from cvserve.brokers import router as router_mod  # noqa: E402
from cvserve.brokers.message import DEADLINE, Message  # noqa: E402
from cvserve.config import load_config  # noqa: E402
from cvserve.machine import machine_info  # noqa: E402
from cvserve.serving.process import ServerThread, free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pipeline_deadlines.json"

CONFIG = """
server:
  broker: inprocess://
  preprocess_threads: 2
pipelines:
  - name: slow
    runtime: simulated
    sim_profile: {{detect: "1:2", classify: "1:{step_ms}"}}
    stage_workers: 1
    timeout_ms: {deadline_ms}
    max_queue: 100000
    max_batch_size: 1
    block_ms: 5
    steps:
      - {{name: detect, model: tiny-yolos, params: {{threshold: 0.0, top_k: 4}}}}
      - {{name: crops, crop: detect}}
      - {{name: classify, model: tiny-resnet, input: crops, via: broker, params: {{top_k: 1}}}}
"""


class Ledger:
    """Every item a worker ran: (started, finished, its deadline), wall clock."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []
        self.original = consumer_mod.StageConsumer._call

    def install(self) -> None:
        ledger = self

        async def _call(self, messages: list[Message]) -> list[Message]:
            t0 = time.time()
            out = await ledger.original(self, messages)
            t1 = time.time()
            for m in messages:
                ledger.rows.append((t0, t1, float(m.headers.get(DEADLINE, float("inf")))))
            return out

        consumer_mod.StageConsumer._call = _call


def switch_deadlines(on: bool) -> None:
    """``none``: the old behaviour, no deadline check and no withdrawal."""
    Message.expired = _EXPIRED if on else (lambda self, now: False)
    router_mod.ResultRouter._withdraw = _WITHDRAW if on else (lambda self, topic, ids: None)


_EXPIRED = Message.expired
_WITHDRAW = router_mod.ResultRouter._withdraw


async def load(url: str, rate: float, seconds: float, body: bytes) -> dict[str, int]:
    codes: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:

        async def one() -> None:
            try:
                r = await c.post("/v1/pipelines/slow:predict", content=body)
                key = str(r.status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            codes[key] = codes.get(key, 0) + 1

        tasks = []
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            tasks.append(asyncio.create_task(one()))
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return codes


def run_variant(args, variant: str, body: bytes, cache: str, ledger: Ledger) -> dict:
    switch_deadlines(variant == "deadlines")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slow.yaml"
        path.write_text(CONFIG.format(step_ms=args.step_ms, deadline_ms=args.deadline_ms))
        cfg = load_config(path)
        from dataclasses import replace

        cfg = replace(cfg, port=free_port(), cache_dir=cache)
        ledger.rows.clear()
        with ServerThread(cfg) as server:
            codes = asyncio.run(load(server.url, args.rate, args.seconds, body))
            # let the worker drain what is queued: in `none` it keeps running stale items
            time.sleep(args.drain_s)
            doc = httpx.get(f"{server.url}/v1/pipelines/slow").json()
        rows = list(ledger.rows)
    ran = len(rows)
    finished_late = sum(1 for _, t1, d in rows if t1 > d)
    started_late = sum(1 for t0, _, d in rows if t0 > d)
    busy = sum(t1 - t0 for t0, t1, _ in rows)
    after = sum(max(0.0, t1 - max(t0, d)) for t0, t1, d in rows)
    step = next(s for s in doc["steps"] if s["name"] == "classify")
    return {
        "variant": variant,
        "codes": codes,
        "items_run": ran,
        "finished_after_deadline": finished_late,
        "started_after_deadline": started_late,
        "wasted_work_share": after / busy if busy else 0.0,
        "wasted_share": finished_late / ran if ran else 0.0,
        "started_late_share": started_late / ran if ran else 0.0,
        "dropped_expired": step.get("workers_here", {}).get("expired", 0),
        "withdrawn": doc["router"]["withdrawn"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=12.0, help="load per variant (default 12)")
    p.add_argument("--rate", type=float, default=5.0, help="requests/s (default 5: 20 items/s)")
    p.add_argument("--step-ms", type=int, default=250, help="classifier ms per item (250)")
    p.add_argument("--deadline-ms", type=int, default=2000, help="request deadline (2000)")
    p.add_argument("--drain-s", type=float, default=4.0, help="wait after the load (4)")
    p.add_argument("--repeats", type=int, default=2, help="repeats of each variant (2)")
    p.add_argument("--cache-dir", help="model store (default: cvserve's)")
    p.add_argument("--out", default=str(RESULTS), help=f"results JSON (default {RESULTS})")
    args = p.parse_args()

    from cvserve.models import store

    cache = args.cache_dir or str(store.cache_dir())
    for name in ("tiny-yolos", "tiny-resnet"):
        store.ensure_built(name, cache)
    body = (Path(__file__).parents[1].parent / "shared/data/images/small/person.jpg").read_bytes()
    ledger = Ledger()
    ledger.install()
    runs = []
    for rep in range(args.repeats):
        for variant in variant_order(["deadlines", "none"], rep):
            r = run_variant(args, variant, body, cache, ledger)
            r["repeat"] = rep
            runs.append(r)
            print(json.dumps(r))
    summary = {}
    for variant in ("deadlines", "none"):
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            "wasted_work_share_median": statistics.median(r["wasted_work_share"] for r in mine),
            "wasted_work_share": median_range(r["wasted_work_share"] for r in mine),
            "wasted_share": median_range(r["wasted_share"] for r in mine),
            "started_late_share": median_range(r["started_late_share"] for r in mine),
            "items_run": median_range(r["items_run"] for r in mine),
        }
    print(f"{'variant':<10} {'items run':>12} {'work after deadline':>20} "
          f"{'items finished late':>20} {'items started late':>20}")  # fmt: skip
    for v, s in summary.items():
        print(f"{v:<10} {s['items_run']:>12} {s['wasted_work_share']:>20} "
              f"{s['wasted_share']:>20} {s['started_late_share']:>20}")  # fmt: skip
    out = {"benchmark": "pipeline_deadlines", "config": vars(args), "machine": machine_info(),
           "note": "simulated step time (no CPU burnt); machine busy with other work",
           "runs": runs, "summary": summary}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

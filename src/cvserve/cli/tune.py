"""``cvserve tune``: the settings with the highest throughput within a p99 SLO."""

from __future__ import annotations

import argparse
import logging
import sys

from cvserve.cli._common import add_cache_arg, add_seconds_alias, say


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="find the settings with the highest throughput whose p99 meets an SLO",
        description="Searches max batch, max delay, instances, intra-op threads, "
        "preprocessing threads and the JPEG decoder for MODEL, measuring every candidate "
        "with a real `cvserve serve` and a closed-loop concurrency sweep of --images. The "
        "search starts from the defaults (always measured first) and changes one knob at a "
        "time while it helps, within --budget seconds. Writes the winner to --out as a "
        "config for `cvserve serve --config`, keeps every measured candidate in "
        "OUT.tune.json (a rerun reuses them; --fresh starts over) and prints a table of "
        "them all. Exits 1 when no candidate meets the SLO.",
    )
    p.add_argument("model", help="a zoo or stored model name")
    p.add_argument("--images", required=True, help="folder (or file) of the images to send")
    p.add_argument(
        "--slo-p99-ms", type=float, required=True, metavar="MS",
        help="the p99 latency every measured point must stay within",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=float, default=1800.0, metavar="SECONDS",
        help="wall time for the search (default 1800); a candidate is not started unless "
        "the longest measurement so far fits in what is left",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="FILE.yaml", help="the winning config")
    p.add_argument(
        "--fresh", action="store_true",
        help="measure everything again (ignore the state file OUT.tune.json)",
    )  # fmt: skip
    p.add_argument(
        "--point-duration", type=float, default=5.0, metavar="S",
        help="seconds measured per concurrency point (default 5; more for slow models: a "
        "p99 wants a few hundred requests)",
    )  # fmt: skip
    p.add_argument("--warmup-ms", type=float, default=1000.0, metavar="MS",
                   help="load before each point is measured (default 1000)")  # fmt: skip
    add_seconds_alias(p, "--warmup", "--warmup-ms", "warmup_ms")
    p.add_argument(
        "--max-concurrency", type=int, default=64,
        help="highest closed-loop concurrency tried (default 64, the default --max-queue)",
    )  # fmt: skip
    p.add_argument(
        "--min-gain", type=float, default=0.03, metavar="FRACTION",
        help="a step must beat the best so far by more than this to count (default 0.03)",
    )  # fmt: skip
    add_cache_arg(p)
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cvserve.tune import TuneConfig, TuneError, TuneStateError, run_tune
    from cvserve.tune.console import TuneProgress, candidates_table

    # each point's warnings are in its numbers; the terminal shows progress
    logging.getLogger("cvserve.bench").setLevel(logging.ERROR)
    config = TuneConfig(
        model=args.model,
        images=args.images,
        slo_p99_ms=args.slo_p99_ms,
        out=args.out,
        budget_s=args.budget,
        fresh=args.fresh,
        cache_dir=args.cache_dir,
        point_s=args.point_duration,
        warmup_s=args.warmup_ms / 1000,
        max_concurrency=args.max_concurrency,
        min_gain=args.min_gain,
        command=["cvserve", *sys.argv[1:]] if sys.argv[1:2] == ["tune"] else ["cvserve", "tune"],
    )
    try:
        with TuneProgress(Console(stderr=True)) as progress:
            report = run_tune(config, progress=progress)
    except (TuneError, TuneStateError) as e:
        say(f"error: {e}")
        return 2
    res = report.result
    title = (f"cvserve tune {args.model}: {len(res.candidates)} candidates in "
             f"{report.elapsed_s:.0f} s ({res.stop_reason}), SLO p99 <= {args.slo_p99_ms:g} ms")  # fmt: skip
    Console().print(candidates_table(report.rows, args.slo_p99_ms, title))
    say(f"state (every candidate): {report.state_path}")
    if res.winner is None:
        say(f"no candidate met the SLO (p99 <= {args.slo_p99_ms:g} ms); {args.out} not written")
        return 1
    w, d = res.winner.measurement, res.default.measurement
    gain = (f"{w.throughput_rps / d.throughput_rps:.2f}x the defaults' {d.throughput_rps:.1f}"
            if d.meets_slo else "the defaults met no SLO point")  # fmt: skip
    print(f"winner: {res.winner.settings.label()}: {w.throughput_rps:.1f} req/s, p99 "
          f"{w.p99_ms:.0f} ms at c={w.concurrency} ({gain})")  # fmt: skip
    say(f"wrote {report.config_path} (cvserve serve --config {report.config_path})")
    return 0

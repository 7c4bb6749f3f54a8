"""The README's test command, N times in a row, with K CPU-burning processes beside it.

A suite that passes on any machine passes on a busy one: this runs ``python -m pytest -q``
(the README's command, in the repository root) ``--runs`` times while ``--burners``
processes spin a core each, and reports each run's passed/failed/skipped counts, its
duration and the tests that failed. It exits 1 if any run had a failure or an error.

    python benchmarks/suite_under_load.py                    # 3 runs, 2 burners, whole suite
    python benchmarks/suite_under_load.py --runs 1 --burners 1 -- tests/bench/test_console.py
    python benchmarks/suite_under_load.py -- -k "console or profile" tests/bench tests/runtime

Everything after ``--`` goes to pytest as it is (a subset, ``-x``, ``-p no:randomly``);
without it the whole suite runs (about 8 minutes a run alone on 2 cores, longer under
load). Set ``CI=true`` in the environment to run as CI does, where a skip that is not
marked ``gpu`` or ``peers`` fails. Writes ``benchmarks/results/suite_under_load.json``
(with each run's log tail) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "pytest", "-q"]  # the README's test command
COUNTED = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")
# pytest's last line, e.g. "2 failed, 1223 passed, 12 skipped, 3 warnings in 480.21s"
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")
_SUMMARY = re.compile(r"^=*\s*(?:\d+ \w+(?:, )?)+.* in [\d.]+s")


def parse_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing summary line (0 for what it does not name)."""
    counts = dict.fromkeys(COUNTED, 0)
    lines = [ln for ln in output.splitlines() if _SUMMARY.match(ln.strip())]
    for n, kind in _COUNT.findall(lines[-1] if lines else ""):
        counts["errors" if kind.startswith("error") else kind] += int(n)
    return counts


def failed_tests(output: str) -> list[str]:
    """The ids of the ``-ra`` short summary's FAILED and ERROR lines."""
    return [ln.split()[1] for ln in output.splitlines() if ln.startswith(("FAILED ", "ERROR "))]


def start_burners(k: int) -> list[subprocess.Popen]:
    """``k`` processes that each keep one core busy until killed."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(k)
    ]


def stop_burners(burners: list[subprocess.Popen]) -> None:
    for proc in burners:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run_suite(pytest_args: list[str], timeout_s: float) -> dict:
    """One run of the suite: its counts, duration, failures and the end of its output."""
    cmd = [*COMMAND, *pytest_args]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout_s)  # fmt: skip
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        output, rc = out + f"\n(timed out after {timeout_s:.0f} s)", None
    duration = time.perf_counter() - t0
    counts = parse_counts(output)
    return {
        "command": cmd,
        "returncode": rc,
        **counts,
        "duration_s": round(duration, 1),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "failed_tests": failed_tests(output),
        "green": rc == 0 and counts["failed"] == 0 and counts["errors"] == 0,
        "tail": output.splitlines()[-60:],
    }


def table(runs: list[dict], burners: int) -> None:
    from rich.console import Console

    from cvserve.bench.console import fit_table

    rows = [
        [i + 1, r["passed"], r["failed"], r["errors"], r["skipped"], r["duration_s"],
         r["load_1min_after"], "yes" if r["green"] else "[red]no[/]"]
        for i, r in enumerate(runs)
    ]  # fmt: skip
    notes = [f"{burners} CPU-burning processes beside each run; load = 1-min load average"]
    for i, r in enumerate(runs):
        notes += [f"run {i + 1} failed: {t}" for t in r["failed_tests"]]
        if r["returncode"] is None:
            notes.append(f"run {i + 1}: timed out")
    Console(width=80).print(
        fit_table(
            ["run", "passed", "failed", "errors", "skipped", "seconds", "load", "green"],
            rows,
            title="python -m pytest -q under load",
            caption=notes,
        )
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if (
        "--" in argv) else (argv, [])  # fmt: skip
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="arguments after -- go to pytest")  # fmt: skip
    p.add_argument("--runs", type=int, default=3, help="runs of the suite, one after another")
    p.add_argument("--burners", type=int, default=2, help="CPU-burning processes beside it")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run at most")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "suite_under_load.json"))
    a = p.parse_args(ours)
    if a.runs < 1 or a.burners < 0:
        p.error("--runs must be >= 1 and --burners >= 0")
    a.pytest_args = pytest_args

    runs: list[dict] = []
    # SIGTERM ends the run like Ctrl-C: the suite and the burners stop with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    burners = start_burners(a.burners)
    try:
        for i in range(a.runs):
            print(f"run {i + 1}/{a.runs}: {' '.join(['python -m pytest -q', *pytest_args])} "
                  f"beside {a.burners} burners", file=sys.stderr, flush=True)  # fmt: skip
            r = run_suite(pytest_args, a.timeout)
            runs.append(r)
            print(f"run {i + 1}/{a.runs}: {r['passed']} passed, {r['failed']} failed, "
                  f"{r['errors']} errors, {r['skipped']} skipped in {r['duration_s']:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            for test in r["failed_tests"]:
                print(f"  failed: {test}", file=sys.stderr, flush=True)
    finally:
        stop_burners(burners)

    from cvserve.bench.results import write_benchmark

    summary = {
        "runs": len(runs),
        "green_runs": sum(r["green"] for r in runs),
        "all_green": all(r["green"] for r in runs),
        **{k: [r[k] for r in runs] for k in ("passed", "failed", "errors", "skipped")},
        "duration_s": [r["duration_s"] for r in runs],
    }
    out = write_benchmark(a.out, "suite_under_load", a, summary=summary, runs=runs)
    table(runs, a.burners)
    print(f"wrote {out}", file=sys.stderr)
    return 0 if summary["all_green"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

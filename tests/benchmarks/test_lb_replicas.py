"""``benchmarks/lb_replicas.py --quick`` end to end: replicas behind a real HAProxy, each
restarted in turn under load, and no request lost."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="no haproxy on PATH (Debian/Ubuntu: apt-get install haproxy)",
)


@needs_haproxy
def test_rolling_restart_behind_haproxy_loses_nothing(model_cache, tmp_path):
    committed = (BENCHMARKS / "results" / "lb_replicas.json").read_bytes()
    # no --out: --quick writes to the temporary folder, never over the committed result
    out = tmp_path / "lb_replicas-quick.json"
    cmd = [sys.executable, str(BENCHMARKS / "lb_replicas.py"), "--quick",
           "--cache-dir", str(model_cache)]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (BENCHMARKS / "results" / "lb_replicas.json").read_bytes() == committed
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["requests"] > 0
    assert run["outcomes"] == {"200": run["requests"]}, run["first_errors"]
    assert run["lost"] == run["transport_errors"] == run["non_200"] == 0
    # HAProxy saw the same requests and answered each with a 2xx
    assert run["haproxy"]["frontend"]["req_tot"] == run["requests"]
    assert run["haproxy"]["frontend"]["hrsp_2xx"] == run["requests"]
    # every replica was restarted: HAProxy took it out, then back in, and it exited cleanly
    names = [r["replica"] for r in run["restarts"]]
    assert names == ["r0", "r1"]
    for r in run["restarts"]:
        assert r["old_exit_code"] == 0
        assert r["haproxy_down_after_s"] is not None
        seen = [st for _, sv, st in run["status_changes"] if sv == r["replica"]]
        assert seen[0] == "UP" and "DOWN" in seen and seen[-1] == "UP"
    assert "retry-on conn-failure empty-response 503" in run["haproxy_cfg"]


def test_without_haproxy_it_fails_clearly(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "lb_replicas.py"), "--quick",
           "--haproxy", str(tmp_path / "no-such-haproxy"), "--out", str(tmp_path / "x.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not found on PATH" in proc.stderr and "apt-get install haproxy" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def _script():
    sys.path.insert(0, str(BENCHMARKS))  # it imports its sibling rolling_restart.py
    try:
        spec = importlib.util.spec_from_file_location("lb_replicas", BENCHMARKS / "lb_replicas.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_table_and_summary_fit_80_columns():
    from rich.console import Console

    lb = _script()
    rows = json.loads((BENCHMARKS / "results" / "lb_replicas.json").read_text())["runs"]
    console = Console(width=80, record=True)
    console.print(lb.results_table(rows, "rolling restart of 3 replicas behind HAProxy 2.6"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "4380" in text and "182.5" in text  # run 3 of the committed result, whole
    r = rows[0]
    line = lb._summary_line(r, r["haproxy"]["backend"], r["haproxy"]["frontend"], 0)
    assert max(len(x) for x in line.splitlines()) <= 80
    assert lb.QUICK_RESULT != lb.RESULT and "results" not in lb.QUICK_RESULT.parts

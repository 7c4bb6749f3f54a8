"""``benchmarks/lb_replicas.py --quick`` end to end: replicas behind a real HAProxy, each
restarted in turn under load, and no request lost."""

from __future__ import annotations

import json
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
    out = tmp_path / "lb.json"
    cmd = [sys.executable, str(BENCHMARKS / "lb_replicas.py"), "--quick",
           "--cache-dir", str(model_cache), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
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

"""``benchmarks/suite_under_load.py``: the test command run repeatedly beside CPU burners,
counted from pytest's own summary (here on a two-test file, not the suite)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "suite_under_load.py"


def _script():
    spec = importlib.util.spec_from_file_location("suite_under_load_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_come_from_pytests_summary_line():
    s = _script()
    out = (
        "FAILED tests/a.py::test_x - assert 1 == 2\nERROR tests/b.py::test_y - boom\n"
        "== 5 failed, 1223 passed, 12 skipped, 2 errors, 3 warnings in 480.21s (0:08:00) ==\n"
    )
    counts = s.parse_counts(out)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (
        1223, 5, 12, 2,
    )  # fmt: skip
    assert s.parse_counts("1 passed, 3 deselected in 0.1s")["deselected"] == 3
    assert s.parse_counts("no summary here") == dict.fromkeys(s.COUNTED, 0)
    assert s.failed_tests(out) == ["tests/a.py::test_x", "tests/b.py::test_y"]


def test_runs_the_command_beside_burners_and_reports_each_run(tmp_path):
    (tmp_path / "test_two.py").write_text(
        "def test_ok():\n    pass\n\n\ndef test_bad():\n    assert 1 == 2\n"
    )
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "2", "--burners", "1", "--out", str(out),
         "--", str(tmp_path / "test_two.py"), "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # a run had a failure
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "suite_under_load" and doc["config"]["burners"] == 1
    assert doc["summary"]["runs"] == 2 and doc["summary"]["green_runs"] == 0
    for run in doc["runs"]:
        assert (run["passed"], run["failed"], run["skipped"]) == (1, 1, 0)
        assert run["command"][1:4] == ["-m", "pytest", "-q"] and run["returncode"] == 1
        assert [t.rsplit("::", 1)[1] for t in run["failed_tests"]] == ["test_bad"]
    assert "run 2/2: 1 passed, 1 failed" in proc.stderr
    assert "test_bad" in proc.stdout  # the table's notes name it

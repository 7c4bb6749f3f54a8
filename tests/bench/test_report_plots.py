"""``cvserve report``: concurrency on a log2 axis ticked at the measured values, and no
matplotlib chatter in its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure

from cvserve.bench.report import report

SWEEP = Path(__file__).resolve().parents[2] / "benchmarks/results/sweep-resnet18.json"


def test_concurrency_axis_is_log2_at_the_measured_values(tmp_path, monkeypatch):
    saved: dict[str, Figure] = {}
    real = Figure.savefig

    def keep(fig, path, *a, **k):  # noqa: ANN001, ANN002, ANN003
        saved[Path(path).name] = fig
        return real(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    report([SWEEP], tmp_path)
    fig = saved["throughput_latency_closed.png"]
    for ax in fig.axes[:2]:
        assert ax.get_xscale() == "log"
        assert list(ax.get_xticks()) == [1, 2, 4, 8, 16, 32]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16", "32"]
        assert "log2" in ax.get_xlabel()


def test_no_matplotlib_info_lines(tmp_path):
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}  # a fresh font cache
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                         env.get("PYTHONPATH", "")])  # fmt: skip
    cmd = [sys.executable, "-m", "cvserve", "report", str(SWEEP), "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "INFO" not in proc.stderr and "fontManager" not in proc.stderr, proc.stderr
    assert "throughput_latency_closed.png" in proc.stdout

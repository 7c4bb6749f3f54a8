"""``benchmarks/hostile.py`` runs every attack end to end at a tiny scale, and what the
HTTP limits promise shows in its result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_hostile_benchmark_runs_every_attack(model_cache, tmp_path):
    out = tmp_path / "hostile.json"
    cmd = [
        sys.executable, str(BENCHMARKS / "hostile.py"), "--cache-dir", str(model_cache),
        "--duration", "1", "--connections", "40", "--grpc-calls", "2", "--grpc-mb", "1",
        "--header-mb", "64", "--stalled", "2", "--upload-mb", "1", "--out", str(out),
        # room for one stalled 1 MiB body beside the legitimate client's 100 KB photos
        # (a body is let in while it leaves as much room as it takes: 2.5 MiB holds one
        # 1 MiB body and a photo arriving at once), so the other is refused before it is
        # read. (2 MiB refused both under load whenever a photo was arriving.)
        "--serve-args", "--max-body-bytes 1MiB --max-body-bytes-in-flight 2621440",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "huge-header" in proc.stdout  # the table
    doc = json.loads(out.read_text())
    rows = doc["result"]["rows"]
    attacks = {"quiet", "huge-header", "idle", "slowloris", "stalled-upload", "half-body",
               "random-bytes"}  # fmt: skip
    assert attacks <= set(rows), sorted(rows)
    for name, row in rows.items():
        assert not row.get("server_exited"), name
        assert row["legit_requests"] > 0 and row["healthz_probes"] > 0, (name, row)
    header = rows["huge-header"]["attack"]
    # every 64 MB header was cut short: the server stopped reading it. (64 MB, more than
    # the kernel's socket buffers can take on both sides (tcp_rmem max 32 MB + tcp_wmem
    # 4 MB here): a smaller header fits in them whole while a busy server is slow to
    # close, and then looks sent.)
    assert header["headers"] > 0 and header["refused_mid_header"] == header["headers"], header
    assert header["max_mb_sent"] < 64
    assert rows["idle"]["attack"]["opened"] == 40
    stalled = rows["stalled-upload"]["attack"]
    assert stalled["uploads"] == 2 and stalled["refused_503"] == 1, stalled
    assert "RSS after" in proc.stdout

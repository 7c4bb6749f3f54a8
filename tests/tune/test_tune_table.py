"""tune's table of candidates fits 80 columns without cutting a word."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from cvserve.tune.console import candidates_table

STATE = Path(__file__).resolve().parents[2] / "benchmarks/results/tune/resnet18.yaml.tune.json"


def test_candidates_table_fits_80_columns():
    rows = json.loads(STATE.read_text())["last_run"]["table"]
    rows[3] |= {"winner": True, "reused": True, "p99_ms": None, "p99_c1_ms": 1234.5}
    console = Console(width=80, record=True)
    console.print(candidates_table(rows, 200, "cvserve tune resnet18: 14 candidates"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    body = text.split("─" * 10, 1)[1]
    # one line per candidate: nothing folded onto a second line
    assert sum(1 for line in body.splitlines() if line[:3].strip().rstrip("*r").isdigit()) == 14
    assert "pil-reduced" in body and "simplejpeg" in body and "(1234.5)" in body

"""An experiment's points as one CSV table: a row per point (id, status, reason,
simulated), a column per label and per scalar metric (nested metrics as ``metric.key``)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from cvserve.study.results import ExperimentResult
from cvserve.trace import STAGES

__all__ = ["write_csv"]


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics as they are; dict metrics as ``<metric>.<key>`` columns."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            order = {s: i for i, s in enumerate(STAGES)}
            for sub in sorted(value, key=lambda s: (order.get(s, len(order)), str(s))):
                if not isinstance(value[sub], dict | list):
                    flat[f"{key}.{sub}"] = value[sub]
        elif not isinstance(value, list):
            flat[key] = value
    return flat


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def write_csv(result: ExperimentResult, path: str | os.PathLike[str]) -> Path:
    """One row per point: id, status, reason, simulated, each label, each metric."""
    fixed = ["id", "status", "reason", "simulated"]
    label_cols = list(dict.fromkeys(k for p in result.points for k in p.labels))
    taken = set(fixed) | set(label_cols)
    metric_cols: list[str] = []
    rows = []
    for p in result.points:
        row = {"id": p.id, "status": p.status, "reason": p.reason, "simulated": p.simulated}
        row |= {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in p.labels.items()}
        for key, value in _flat_metrics(p.metrics).items():
            col = key if key not in taken else f"metrics.{key}"
            if col not in metric_cols:
                metric_cols.append(col)
            row[col] = value
        rows.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        columns = fixed + label_cols + metric_cols
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in columns])
    return path

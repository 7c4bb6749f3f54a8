"""The state file beside ``--out`` (``FILE.yaml.tune.json``): every measured candidate, so
that rerunning the same command measures only what it has not measured yet.

A candidate is reused only under the same key: model, images (their names and a digest of
their bytes), SLO, how a point is measured, and the machine's cores. The file is
rewritten whole (to a temporary file, then renamed) after every candidate, so a run cut
short loses at most the candidate it was measuring.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cvserve.tune.search import Candidate, Measurement, Settings

SCHEMA = "cvserve.tune/1"


class TuneStateError(ValueError):
    """A state file that is not one of ``cvserve tune``'s."""


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".tune.json")


def images_digest(images: list[Any]) -> str:
    """A digest of the images' names and bytes (BenchImage-like: ``.name``, ``.data``)."""
    h = hashlib.sha256()
    for im in sorted(images, key=lambda im: im.name):
        h.update(im.name.encode() + b"\0" + hashlib.sha256(im.data).digest())
    return h.hexdigest()[:16]


class TuneState:
    """The candidates of every run that wrote ``path``, and the last run's table."""

    def __init__(self, path: str | Path, *, fresh: bool = False) -> None:
        self.path = Path(path)
        self.doc: dict[str, Any] = {"schema": SCHEMA, "candidates": [], "last_run": None}
        if not fresh and self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise TuneStateError(
                    f"cannot read {self.path}: {e} (--fresh starts over)"
                ) from None
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
                raise TuneStateError(
                    f"{self.path} is not a {SCHEMA} state file (--fresh starts over)"
                )
            self.doc = doc

    def known(self, key: dict[str, Any]) -> dict[Settings, Measurement]:
        """Measurements made under ``key`` (the latest one per setting)."""
        out = {}
        for entry in self.doc["candidates"]:
            if entry.get("key") == key:
                out[Settings.from_dict(entry["settings"])] = Measurement.from_dict(
                    entry["measurement"]
                )
        return out

    def add(self, key: dict[str, Any], c: Candidate) -> None:
        """Record a candidate measured now (reused ones are in the file already)."""
        if c.reused:
            return
        self.doc["candidates"].append({
            "key": key, "settings": c.settings.to_dict(), "measurement": c.measurement.to_dict(),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })  # fmt: skip
        self.save()

    def finish(self, run: dict[str, Any]) -> None:
        """Record the run's summary and table."""
        self.doc["last_run"] = run
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(self.path)

"""Latency profiles of the simulated accelerator (:mod:`cvserve.runtime.simulated`): the
``cvserve.profile/1`` JSON format, parsing (a file, a packaged name, ``batch:ms`` pairs),
interpolation between measured batch sizes, and scaling to a faster device. A profile is
measured on a real device by ``cvserve profile`` (:mod:`cvserve.runtime.profile`) or given
by hand."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILE_SCHEMA = "cvserve.profile/1"

__all__ = ["PROFILE_SCHEMA", "SimProfile", "packaged_profiles"]


def packaged_profiles() -> dict[str, Path]:
    """The example profiles shipped with cvserve, by short name (file stem)."""
    root = resources.files("cvserve.runtime") / "profiles"
    out: dict[str, Path] = {}
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return out
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")]] = Path(str(entry))
    return out


@dataclass(frozen=True)
class SimProfile:
    """Latency of one batch, by batch size, on the device being simulated.

    Between the given batch sizes the latency is interpolated linearly; below the smallest
    it is the smallest size's latency; above the largest it is extrapolated along the last
    two points (per image, ``latency * b / b_max``, when there is one point or the last
    segment does not rise).
    """

    #: ``{batch_size: milliseconds}``, batch sizes ascending.
    latency_ms: Mapping[int, float]
    model: str | None = None
    device: str | None = None
    runtime: str | None = None
    #: Where the numbers come from (a measurement, a published table ...).
    source: str | None = None
    created: str | None = None
    machine: Mapping[str, Any] | None = None
    input_shape: list[Any] | None = None
    input_dtype: str | None = None
    #: Any other fields of the profile file, kept when it is saved again.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        points = _check_points(self.latency_ms.items())
        object.__setattr__(self, "latency_ms", dict(points))

    # -- reading ------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | Path | SimProfile) -> SimProfile:
        """A profile from ``"1:0.9,8:2.4"`` (batch:ms pairs), a JSON file path, or the
        short name of a packaged profile (see :func:`packaged_profiles`)."""
        if isinstance(spec, SimProfile):
            return spec
        if isinstance(spec, Path):
            return cls.load(spec)
        text = str(spec).strip()
        if not text:
            raise ValueError("empty simulated-accelerator profile: give batch:ms pairs "
                             "like '1:0.9,8:2.4', a profile JSON file or a packaged name")  # fmt: skip
        packaged = packaged_profiles()
        if text in packaged:
            return cls.load(packaged[text])
        path = Path(text).expanduser()
        if path.exists() or text.endswith(".json") or "/" in text or ":" not in text:
            if not path.exists():
                names = ", ".join(packaged) or "none"
                raise ValueError(
                    f"cannot read profile {text!r}: no such file (and not a packaged "
                    f"profile: {names}; inline profiles look like '1:0.9,8:2.4')"
                )
            return cls.load(path)
        return cls.from_pairs(text)

    @classmethod
    def from_pairs(cls, text: str, **fields: Any) -> SimProfile:
        """``"1:0.9,8:2.4"``: batch size, colon, milliseconds per batch, comma-separated."""
        points: list[tuple[Any, Any]] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            size, sep, ms = part.partition(":")
            if not sep or not ms.strip():
                raise ValueError(
                    f"profile entry {part!r}: expected BATCH:MS (e.g. '8:2.4'), "
                    "the latency is missing"
                )
            points.append((size.strip(), ms.strip()))
        try:
            checked = _check_points(points)
        except ValueError as e:
            raise ValueError(f"profile {text.strip()!r}: {e}") from None
        fields.setdefault("source", f"given inline: {text.strip()}")
        return cls(latency_ms=dict(checked), **fields)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "profile") -> SimProfile:
        """A profile document (schema ``cvserve.profile/1``); only ``latency_ms`` is needed."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        schema = doc.get("schema")
        if schema is not None and schema != PROFILE_SCHEMA:
            raise ValueError(f"{where}: schema {schema!r}; this cvserve reads {PROFILE_SCHEMA!r}")
        lat = doc.get("latency_ms")
        if not isinstance(lat, Mapping) or not lat:
            raise ValueError(
                f"{where}: needs 'latency_ms', an object of batch size to milliseconds "
                '(e.g. {"1": 0.9, "8": 2.4})'
            )
        try:
            points = _check_points(lat.items())
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        known = {"latency_ms", "schema", *_META_FIELDS}
        return cls(
            latency_ms=dict(points),
            **{k: doc.get(k) for k in _META_FIELDS},
            extra={k: v for k, v in doc.items() if k not in known},
        )

    @classmethod
    def load(cls, path: str | Path) -> SimProfile:
        """Read a profile JSON file."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"cannot read profile {str(path)!r}: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"profile {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(doc, where=f"profile {str(path)!r}")

    # -- using ------------------------------------------------------------------------
    @property
    def batch_sizes(self) -> list[int]:
        return list(self.latency_ms)

    def latency_s(self, batch: int) -> float:
        """Seconds one batch of ``batch`` images takes on the device."""
        if batch < 1:
            raise ValueError(f"batch size must be >= 1, got {batch}")
        sizes = list(self.latency_ms)
        ms = list(self.latency_ms.values())
        if batch <= sizes[0]:
            return ms[0] / 1000.0
        for i in range(1, len(sizes)):
            if batch <= sizes[i]:
                b0, b1 = sizes[i - 1], sizes[i]
                t = (batch - b0) / (b1 - b0)
                return (ms[i - 1] + t * (ms[i] - ms[i - 1])) / 1000.0
        last_b, last_ms = sizes[-1], ms[-1]
        slope = (ms[-1] - ms[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else 0.0
        if slope <= 0:  # one point, or a flat/noisy tail: cost per image of the last point
            return last_ms * batch / last_b / 1000.0
        return (last_ms + slope * (batch - last_b)) / 1000.0

    def scaled(self, factor: float) -> SimProfile:
        """This profile on a device ``factor`` times faster (latencies divided by it)."""
        if not (isinstance(factor, int | float) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale factor must be a positive number, got {factor!r}")
        note = f"latencies divided by {factor:g}"
        return replace(
            self,
            latency_ms={b: ms / factor for b, ms in self.latency_ms.items()},
            device=f"{self.device or 'device'} x{factor:g} faster",
            source=f"{self.source} ({note})" if self.source else note,
        )

    def summary(self, width: int = 80) -> str:
        """One short line for a log: the device and the latency range, e.g. ``A100 80GB
        (DGX A100): batch 1 2.13 ms .. batch 128 48.1 ms`` (``describe`` has the source)."""
        sizes = list(self.latency_ms)
        lo, hi = sizes[0], sizes[-1]
        span = f"batch {lo} {self.latency_ms[lo]:.3g} ms"
        if hi != lo:
            span += f" .. batch {hi} {self.latency_ms[hi]:.3g} ms"
        what = self.device or self.model or ""
        room = max(0, width - len(span) - 2)
        if len(what) > room:
            what = what[: max(0, room - 3)].rstrip() + "..." if room > 3 else ""
        return f"{what}: {span}" if what else span

    def describe(self) -> dict[str, Any]:
        """The short form servers and results report."""
        return {
            "latency_ms": {str(b): ms for b, ms in self.latency_ms.items()},
            "source": self.source,
            "device": self.device,
            "model": self.model,
        }

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema": PROFILE_SCHEMA}
        for key in _META_FIELDS:
            value = getattr(self, key)
            if key == "created" and value is None:
                value = datetime.now(UTC).isoformat(timespec="seconds")
            doc[key] = dict(value) if isinstance(value, Mapping) else value
        doc["latency_ms"] = {str(b): ms for b, ms in self.latency_ms.items()}
        doc.update(self.extra)
        return doc

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (schema ``cvserve.profile/1``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path


_META_FIELDS = (
    "model",
    "device",
    "runtime",
    "source",
    "created",
    "machine",
    "input_shape",
    "input_dtype",
)


def _check_points(items) -> list[tuple[int, float]]:
    """Validated ``(batch, ms)`` pairs, ascending by batch size."""
    points: dict[int, float] = {}
    for raw_b, raw_ms in items:
        try:
            b = float(raw_b)
        except (TypeError, ValueError):
            raise ValueError(f"batch size {raw_b!r} is not a number") from None
        if not b.is_integer() or b < 1:
            raise ValueError(f"batch size {raw_b!r} must be a positive integer")
        if raw_ms is None or isinstance(raw_ms, bool):
            raise ValueError(f"batch size {int(b)}: latency not given")
        try:
            ms = float(raw_ms)
        except (TypeError, ValueError):
            raise ValueError(f"batch size {int(b)}: latency {raw_ms!r} is not a number") from None
        if not math.isfinite(ms) or ms <= 0:
            raise ValueError(f"batch size {int(b)}: latency must be > 0 ms, got {raw_ms!r}")
        if int(b) in points:
            raise ValueError(f"batch size {int(b)} is given twice")
        points[int(b)] = ms
    if not points:
        raise ValueError("a profile needs at least one batch:ms pair")
    return sorted(points.items())

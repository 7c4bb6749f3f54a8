"""The parameters a task head (or a pipeline) accepts per request: declared once, beside
the head, with their type, default and bounds, so the front doors parse and check them
without knowing any task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from cvserve.errors import RequestError

__all__ = ["Param", "ParamError", "describe_params", "parse_params"]


class ParamError(RequestError):
    """A request parameter that is unknown, of the wrong type or out of its bounds."""

    status = 400
    kind = "bad_parameter"


@dataclass(frozen=True)
class Param:
    """One request parameter: ``type`` is int, float, bool or str; ``choices`` limit a str,
    ``lo``/``hi`` (inclusive) a number; ``default`` None means the head decides."""

    name: str
    type: type
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    _: KW_ONLY
    choices: tuple[str, ...] = ()
    help: str = ""

    def parse(self, raw: Any) -> Any:
        """``raw`` (a query string or a JSON value) as this parameter's type; raises
        :class:`ParamError` naming the parameter and its bounds."""
        try:
            if self.type is bool:
                value: Any = _bool(raw)
            elif self.type is int:
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise ValueError(raw)
                value = int(raw)
            elif self.type is float:
                if isinstance(raw, bool):
                    raise ValueError(raw)
                value = float(raw)
                if value != value:  # NaN passes no bound
                    raise ValueError(raw)
            else:
                value = str(raw)
        except (TypeError, ValueError):
            raise ParamError(
                f"{self.name} must be {_a(self.type)}, got {raw!r}", parameter=self.name
            ) from None
        if self.choices and value not in self.choices:
            raise ParamError(
                f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}",
                parameter=self.name,
            )
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ParamError(
                f"{self.name} must be in [{_n(self.lo, '-inf')}, {_n(self.hi, 'inf')}], got {value}",
                parameter=self.name,
                min=self.lo,
                max=self.hi,
            )
        return value

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type.__name__}
        for key in ("default", "lo", "hi"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.choices:
            d["choices"] = list(self.choices)
        if self.help:
            d["help"] = self.help
        return d


def parse_params(declared: Sequence[Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``given`` (name -> raw value) against ``declared``; returns the parsed values
    of the parameters given (defaults are the head's business)."""
    known = {p.name: p for p in declared}
    out: dict[str, Any] = {}
    for name, raw in given.items():
        p = known.get(name)
        if p is None:
            names = ", ".join(known) or "none"
            raise ParamError(f"unknown parameter {name!r}; known: {names}", parameter=name)
        out[name] = p.parse(raw)
    return out


def describe_params(declared: Sequence[Param]) -> list[dict[str, Any]]:
    return [p.describe() for p in declared]


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).lower()
    if text not in ("1", "0", "true", "false"):
        raise ValueError(raw)
    return text in ("1", "true")


def _a(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")


def _n(v: float | None, unbounded: str) -> str:
    return unbounded if v is None else f"{v:g}"

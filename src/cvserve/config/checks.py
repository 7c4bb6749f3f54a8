"""Strict checks of configuration values: an integer is an int (not a bool or a float), a
duration is a finite number of milliseconds; each error names the key, the value and what
is allowed."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot work."""


def _what(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def integer(key: str, value: Any, minimum: int) -> None:
    """``value`` is an int >= ``minimum``: ValueError otherwise (a bool, a float such as
    ``1.5`` or ``2.0``, or a string is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer >= {minimum}, not {_what(value)}")
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}")


def number(key: str, value: Any, *, above: float | None = None, at_least: float | None = None,
           unit: str = "") -> None:  # fmt: skip
    """``value`` is a finite int or float (not a bool, NaN or infinity), ``> above`` or
    ``>= at_least``: ValueError otherwise."""
    kind = f"a finite number of {unit}" if unit else "a finite number"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        bound = f" > {above:g}" if above is not None else f" >= {at_least:g}"
        raise ValueError(f"{key} must be {kind}{bound}, not {_what(value)}")
    if above is not None and not value > above:
        raise ValueError(f"{key} must be > {above:g}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{key} must be >= {at_least:g}")


def duration_ms(key: str, value: Any, *, positive: bool) -> None:
    """A duration in milliseconds: finite, and > 0 (``positive``) or >= 0."""
    if positive:
        number(key, value, above=0, unit="milliseconds")
    else:
        number(key, value, at_least=0, unit="milliseconds")


def flag(key: str, value: Any) -> None:
    """``value`` is true or false (YAML ``true``/``false``), not a number or a string."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {_what(value)}")

"""Repeats of a benchmark's variants (CONVENTIONS.md: compare A and B interleaved, in one
run, and quote medians with their spread): the order in which one repeat runs its
variants, so none always runs first (cold caches) or last (a machine that has warmed up),
and how the repeats of one number are printed."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["median_range", "variant_order"]


def variant_order(variants: Iterable[T], rep: int, *, rotate: bool = False) -> list[T]:
    """``variants`` in the order repeat ``rep`` (0, 1, ...) runs them.

    Alternating (the default): as given on even repeats, reversed on odd ones, so with
    two variants each runs first half the time and every pair of repeats is balanced.
    ``rotate``: shifted by ``rep`` places, so with N variants each takes every position
    once in N repeats."""
    items = list(variants)
    if rotate and items:
        k = rep % len(items)
        return items[k:] + items[:k]
    return items if rep % 2 == 0 else items[::-1]


def median_range(values: Iterable[float | None]) -> str:
    """Repeats of one number as ``median [min-max]`` (3 significant digits); ``-`` when
    none was measured, the value alone when there is one."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3g}"
    return f"{statistics.median(vals):.3g} [{min(vals):.3g}-{max(vals):.3g}]"

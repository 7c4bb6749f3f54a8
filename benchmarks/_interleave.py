"""The order in which one repeat of a benchmark runs its variants (CONVENTIONS.md: compare
A and B interleaved, in one run). Every benchmark script that compares variants uses it,
so none of them always runs first (cold caches) or last (a machine that has warmed up)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["variant_order"]


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

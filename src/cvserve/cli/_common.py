"""What every command module shares: one way to print, flag value types, the cache flag,
and old flag spellings accepted with a one-line warning."""

from __future__ import annotations

import argparse
import sys

#: ``[worker N] `` in a process of ``serve --workers``: its lines share the parent's stderr.
_prefix = ""


def set_prefix(prefix: str) -> None:
    global _prefix
    _prefix = prefix


def prefix() -> str:
    return _prefix


def say(message: str) -> None:
    """One line to stderr: progress and errors (only the CLI prints)."""
    print(_prefix + message, file=sys.stderr, flush=True)


def csv_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def csv_ints(text: str) -> list[int]:
    values = csv_floats(text)
    if any(v != int(v) or v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers: {text!r}")
    return [int(v) for v in values]


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        help="model store (default: $CVSERVE_CACHE or ~/.cache/cvserve)",
    )


class _SecondsFlag(argparse.Action):
    """An old spelling of a duration flag, in seconds: stores milliseconds in the new
    flag's ``dest`` and warns once, naming the new spelling."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:  # noqa: ANN001
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None) -> None:  # noqa: ANN001
        seconds = float(value)
        ms = seconds * 1000.0
        say(f"warning: {option_string} is deprecated (seconds): use {self.new} {ms:g} "
            "(milliseconds)")  # fmt: skip
        setattr(namespace, self.dest, ms)


def add_seconds_alias(p: argparse._ActionsContainer, old: str, new: str, dest: str) -> None:
    """Accept ``old S`` (a duration in seconds, deprecated) as ``new S*1000``; hidden from
    --help."""
    p.add_argument(old, action=_SecondsFlag, new=new, dest=dest, type=_seconds,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None

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


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` that shows every default: an option whose help does not say its default
    gets ``(default: X)`` (not for flags that are off, nor unset options whose help says
    what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            not action.option_strings
            or "default" in text.lower()
            or d is None
            or d is False
            or d is argparse.SUPPRESS
            or d in ("", [])
        ):
            return text
        if isinstance(d, list | tuple):
            shown = ",".join(map(str, d))
        elif isinstance(d, float):
            shown = f"{d:g}"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


class _RenamedFlag(argparse.Action):
    """An old spelling of a renamed flag: stores ``convert(value)`` in the new flag's
    ``dest`` and warns, naming the new spelling and the value to give it."""

    def __init__(self, option_strings, dest, new: str, convert, **kwargs) -> None:  # noqa: ANN001
        self.new, self.convert = new, convert
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None) -> None:  # noqa: ANN001
        if self.convert is None:  # a switch (nargs=0)
            say(f"warning: {option_string} is deprecated: use {self.new}")
            setattr(namespace, self.dest, True)
            return
        new_value = self.convert(value)
        say(f"warning: {option_string} is deprecated: use {self.new} {new_value:g}"
            if isinstance(new_value, float) else
            f"warning: {option_string} is deprecated: use {self.new} {new_value}")  # fmt: skip
        setattr(namespace, self.dest, new_value)


def add_renamed(
    p: argparse._ActionsContainer,
    old: str,
    new: str,
    dest: str,
    convert=None,  # noqa: ANN001
    *,
    switch: bool = False,
) -> None:
    """Accept ``old`` (deprecated, hidden from --help) as ``new``: ``convert`` turns its
    value into the new flag's (argparse's type errors name ``old``); ``switch``: a flag
    without a value."""
    if switch:
        p.add_argument(old, action=_RenamedFlag, new=new, convert=None, nargs=0, dest=dest,
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
        return
    p.add_argument(old, action=_RenamedFlag, new=new, convert=convert or (lambda v: v),
                   dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip


def port_number(text: str) -> int:
    """A TCP port: 1-65535, or 0 for any free port (the server says which)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535, or 0 for any free port)")
    return port


_BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2,
               "mb": 1000**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}  # fmt: skip


def byte_size(text: str) -> int:
    """A size in bytes: ``33554432``, ``32MiB``, ``32MB`` (10^6), ``512KiB``."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    try:
        value = float(num) * _BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes (e.g. 33554432, 32MiB, 500KB), got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be at least 1 byte, got {text!r}")
    return int(value)


def did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """``unrecognized arguments: --x`` with the closest options of ``parser``."""
    import difflib

    options = [
        s
        for a in parser._actions
        if a.help != argparse.SUPPRESS
        for s in a.option_strings
        if s.startswith("--")
    ]
    parts = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        close = (
            difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
            if flag.startswith("-")
            else []
        )
        parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return "unrecognized arguments: " + " ".join(parts)


def walk_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("cvserve",)):
    """``(path, parser)`` for ``parser`` and every (sub)command parser under it, each once
    (an alias of a subcommand is not walked twice)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, child in action.choices.items():
                if id(child) not in seen:
                    seen.add(id(child))
                    yield from walk_parsers(child, (*path, name))

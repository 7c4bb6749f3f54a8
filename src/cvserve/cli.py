"""The one entry point: ``cvserve serve|bench|demo|models|report``.

Only this module prints; everything it calls reports through return values and logging.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cvserve import __version__


# --- models ---------------------------------------------------------------------------
def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build, list, add and show models in the model store")
    p.set_defaults(func=lambda a: p.print_help() or 2)


# --- serve ----------------------------------------------------------------------------
def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP")
    p.set_defaults(func=lambda a: p.print_help() or 2)


# --- bench / report -------------------------------------------------------------------
def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure a server with real images")
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot bench results")
    p.set_defaults(func=lambda a: p.print_help() or 2)


# --- demo -----------------------------------------------------------------------------
def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a model, serve it, load it, print where time went")
    p.set_defaults(func=lambda a: p.print_help() or 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cvserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    _add_bench_parser(sub)
    _add_demo_parser(sub)
    _add_models_parser(sub)
    _add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

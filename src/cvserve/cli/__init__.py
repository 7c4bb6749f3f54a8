"""The one entry point: ``cvserve serve|worker|broker|bench|demo|models|report|study|profile|tune``.

Only this package prints; everything it calls reports through return values and logging.
One module per command group; each has ``add_*_parser`` (its flags) and ``cmd_*``.
"""

from __future__ import annotations

import argparse
import logging

from cvserve import __version__
from cvserve.cli import bench, demo, models, profile, serve, study, tune, worker
from cvserve.cli._common import (
    DefaultsFormatter,
    did_you_mean,
    prefix,
    say,
    set_prefix,
    walk_parsers,
)
from cvserve.config.flags import server_config_from_args
from cvserve.errors import missing_extra

__all__ = ["build_parser", "main", "server_config_from_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cvserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_serve_parser(sub)
    worker.add_worker_parser(sub)
    worker.add_broker_parser(sub)
    bench.add_bench_parser(sub)
    demo.add_demo_parser(sub)
    models.add_models_parser(sub)
    bench.add_report_parser(sub)
    study.add_study_parser(sub)
    profile.add_profile_parser(sub)
    tune.add_tune_parser(sub)
    for _, p in walk_parsers(parser):
        p.formatter_class = DefaultsFormatter
        if p is not parser:  # -v after the subcommand too; SUPPRESS: absent keeps the top's
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="debug logging, and the traceback of an error")  # fmt: skip
    return parser


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The deepest (sub)command parser ``args`` went through (its usage fits an error)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            child = action.choices.get(getattr(args, action.dest, None) or "")
            if child is not None:
                return _chosen(child, args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage and the closest flag, not the top-level usage
        _chosen(parser, args).error(did_you_mean(_chosen(parser, args), unknown))
    index = getattr(args, "worker_index", None)
    set_prefix(f"[worker {index}] " if index is not None else "")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {prefix()}%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # "generated new fontManager" and the like are not ours to say
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ImportError as e:
        line = missing_extra(e)
        if line is None or args.verbose:
            raise
        say(f"error: {line}")
        return 2
    except _user_errors() as e:
        if args.verbose:  # the one-line message hides where it came from
            raise
        say(f"error: {e} (-v for the traceback)")
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that deserve one line, not a traceback."""
    from cvserve.brokers.errors import BrokerError
    from cvserve.config import ConfigError
    from cvserve.models.store import InvalidModel, ModelBuildError, ModelNotFound

    return (
        BrokerError,
        ConfigError,
        InvalidModel,
        ModelBuildError,
        ModelNotFound,
        FileNotFoundError,
        FileExistsError,
        OSError,
        ValueError,
    )

"""The ``flava`` command: one subcommand per pipeline stage.

Each command group lives in its own module with a ``register(subparsers)`` function; every handler loads the
config (``--params`` + ``--set`` overrides), calls one stage function from the library and prints its small
metrics dict as JSON. No stage logic lives here.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any, Callable, Sequence

from flava.config import PipelineConfig, load_config

# Command-group modules, in the order they appear in ``flava --help``.
GROUPS = ("flava.cli.pipeline", "flava.cli.data", "flava.cli.pretrain", "flava.cli.evaluate", "flava.cli.launch")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a params value, e.g. --set train.joint.steps=50 (repeatable)",
    )


def config_from(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.params, args.overrides)


def stage_command(
    sub: argparse._SubParsersAction, name: str, help: str, run: Callable[[argparse.Namespace], Any]
) -> argparse.ArgumentParser:
    """Declare a stage subcommand that takes the config arguments and runs ``run(args)``."""
    parser = sub.add_parser(name, help=help, description=help)
    add_config_args(parser)
    parser.set_defaults(handler=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flava", description="FLAVA pretraining pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for module in GROUPS:
        importlib.import_module(module).register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"flava: error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

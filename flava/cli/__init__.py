"""The ``flava`` command: one subcommand per pipeline stage.

Each command group lives in its own module with a ``register(subparsers)`` function; every handler loads the
config (``--params`` + ``--set`` overrides), calls one stage function from the library and prints its small
metrics dict as JSON. No stage logic lives here.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from flava.config import PipelineConfig, ReadRecorder, load_config
from flava.exitcodes import NON_RETRYABLE, PREEMPTED, Preempted
from flava.launch.config import launch_section
from flava.stages import CLI_GROUPS as GROUPS
from flava.stages import by_command
from flava.workspace import WorkspaceBusy, stage_lock

# A directory: each command records the params keys it read and the project modules it loaded there
# (``<command words>.json``), for the test that checks every stage declares them (``flava.stages``).
RECORD_ENV = "FLAVA_RECORD_READS"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a params value, e.g. --set train.joint.steps=50 (repeatable)",
    )


def config_from(args: argparse.Namespace) -> PipelineConfig:
    cfg = load_config(args.params, args.overrides)
    if os.environ.get(RECORD_ENV):
        _record_reads(cfg, Path(os.environ[RECORD_ENV]) / f"{args.group}-{getattr(args, 'command', None) or ''}.json")
    return cfg


def _record_reads(cfg: PipelineConfig, path: Path) -> None:
    recorder = ReadRecorder()
    recorder.watch(cfg)

    def dump() -> None:
        recorder.stop()
        modules = sorted(m for m in sys.modules if m == "flava" or m.startswith("flava."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"params": sorted(recorder.keys), "modules": modules}, indent=1))

    atexit.register(dump)


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
    stage = by_command((args.group, getattr(args, "command", None)) if getattr(args, "command", None)
                       else (args.group,))
    try:
        if stage is None:
            result = args.handler(args)
        else:  # a stage command holds the workspace unless the pipeline run that started it does
            timeout = launch_section(load_config(args.params, args.overrides)).schedule.lock_timeout_s
            with stage_lock(".", stage.name, timeout):
                result = args.handler(args)
    except (ValueError, FileNotFoundError, WorkspaceBusy) as err:
        print(f"flava: error: {err}", file=sys.stderr)
        return NON_RETRYABLE
    except Preempted as stop:  # a checkpoint was saved: a retry of the same command resumes there
        print(f"flava: preempted: {stop}", file=sys.stderr)
        return PREEMPTED
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

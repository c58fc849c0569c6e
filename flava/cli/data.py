"""`flava data ...`: the data stages of the registry (``flava.stages``) plus `generate`. Each handler calls one
stage function ``run_*(cfg) -> dict``."""
from __future__ import annotations

import argparse
import importlib

from flava.cli import config_from, stage_command
from flava.stages import STAGES

GENERATE = ("generate", "flava.data.synthetic:run_generate", "write the embedded synthetic world into paths.raw")


def _handler(entry: str):
    module, _, function = entry.partition(":")

    def run(args: argparse.Namespace):
        return getattr(importlib.import_module(module), function)(config_from(args))

    return run


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("data", help="data stages: generate, prepare, validate, shard, fit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    commands = [GENERATE] + [(s.command[1], s.entry, s.help) for s in STAGES if s.command[0] == "data"]
    for name, entry, help_text in commands:
        stage_command(sub, name, help_text, _handler(entry))

"""`flava stages list|dvc-yaml`: the stage registry (``flava.stages``) and the ``dvc.yaml`` rendered from it."""
from __future__ import annotations

import argparse
import sys

from flava import stages
from flava.cli import config_from, stage_command


def _list(args: argparse.Namespace):
    return {s.name: {"cmd": s.cmd, "params": list(s.params), "deps": list(s.deps), "code": stages.code_files(s)}
            for s in stages.STAGES}


def _dvc_yaml(args: argparse.Namespace):
    sys.stdout.write(stages.render_dvc_yaml())
    return None


def _resolve(args: argparse.Namespace):
    return stages.run_resolve(config_from(args))


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("stages", help="the stage registry: list, dvc-yaml")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="every stage with its command, params keys and dependencies").set_defaults(
        handler=_list)
    sub.add_parser("dvc-yaml", help="print dvc.yaml as rendered from the registry").set_defaults(handler=_dvc_yaml)
    stage_command(sub, "resolve", stages.get("params").help, _resolve)

"""`flava registry promote|rollback|status`: move `@champion` by hand, through the gate and the promotion lock."""
from __future__ import annotations

import argparse

from flava.cli import config_from, stage_command


def _promote(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.tracking.registry import run_registry_promote

    return run_registry_promote(config_from(args), args.version, args.reason, force=args.force)


def _rollback(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.tracking.registry import run_registry_rollback

    return run_registry_rollback(config_from(args), args.reason)


def _status(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.tracking.registry import run_registry_status

    return run_registry_status(config_from(args))


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("registry", help="the model registry by hand: promote, rollback, status")
    sub = parser.add_subparsers(dest="command", required=True, metavar="ACTION")
    promote = stage_command(sub, "promote", "make VERSION @champion if it passes the gate against the current one",
                            _promote)
    promote.add_argument("version", type=int, help="registered version number of eval.registry.model_name")
    promote.add_argument("--reason", required=True, help="why (recorded on the version: tag and description)")
    promote.add_argument("--force", action="store_true",
                         help="promote even if the gate fails (recorded on the version with the gate's reasons)")
    rollback = stage_command(sub, "rollback", "give @champion back to @previous", _rollback)
    rollback.add_argument("--reason", required=True, help="why (recorded on both versions)")
    stage_command(sub, "status", "aliases and every version with its decision and reason", _status)

"""`flava pipeline run`: the main job (raw data in place, then `dvc repro` under one MLflow parent run).

The stages read `params.yaml` through `dvc.yaml`, so this command takes no `--set`: edit `params.yaml` (or use
`dvc exp run -S key=value`) to change a value, and DVC re-runs exactly the stages that depend on it.
"""
from __future__ import annotations

import argparse


def _run(args: argparse.Namespace):
    from flava.config import load_config
    from flava.pipeline import run_pipeline

    return run_pipeline(load_config("params.yaml"), ".", force=args.force, dry=args.dry)


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("pipeline", help="run the whole pipeline (dvc repro under an MLflow parent run)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="pull or generate the raw data if missing, then dvc repro every stage")
    run.add_argument("--force", action="store_true", help="re-run every stage even if up to date")
    run.add_argument("--dry", action="store_true", help="print the stages dvc would run, run nothing")
    run.set_defaults(handler=_run)

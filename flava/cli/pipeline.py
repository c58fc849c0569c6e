"""`flava pipeline run`: the main job (raw data in place, then `dvc repro` under one MLflow parent run).

The stages read `params.yaml` through `dvc.yaml`, so this command takes no `--set`: edit `params.yaml` (or use
`dvc exp run -S key=value`) to change a value, and DVC re-runs exactly the stages that depend on it.
It ends with a few lines for a person (the decision, the numbers that matter, where the report is, how to open
MLflow on this run); `--json` prints the whole result as JSON instead, for scripts.
"""
from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> None:
    # Imported here: flava.pipeline pulls in MLflow and DVC (seconds), which `flava --help` and the stage
    # commands do not need.
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.config import load_config
    from flava.pipeline import WorkspaceBusy, compared_overall, outcome_lines, run_pipeline
    from flava.tracking.runs import tracking_uri

    cfg = load_config("params.yaml")
    try:
        result = run_pipeline(cfg, ".", force=args.force, dry=args.dry, lock_timeout_s=args.wait)
    except WorkspaceBusy as err:
        raise SystemExit(f"flava: error: {err}") from None
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
        return
    champion_overall = compared_overall(tracking_uri(cfg), result["promotion"])
    print("\n".join(outcome_lines(result, champion_overall)))


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("pipeline", help="run the whole pipeline (dvc repro under an MLflow parent run)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="pull or generate the raw data if missing, then dvc repro every stage")
    run.add_argument("--force", action="store_true", help="re-run every stage even if up to date")
    run.add_argument("--dry", action="store_true", help="print the stages dvc would run, run nothing")
    run.add_argument("--json", action="store_true", help="print the result as JSON instead of a summary")
    run.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                     help="wait this long for another pipeline run on this workspace to finish "
                          "(default: launch.schedule.lock_timeout_s)")
    run.set_defaults(handler=_run)

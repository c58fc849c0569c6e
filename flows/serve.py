"""Serve the pipeline flow on its schedule from this process: ``python -m flows.serve [--params params.yaml]``.

The deployment (name, cron, timezone, sweep/joint-on-Kubernetes switches) comes from ``launch.schedule`` in the
params file; the Prefect UI shows it, runs it on schedule and lets users start it with other parameters.
For a worker-based setup use ``infra/prefect.yaml`` (``prefect deploy --prefect-file infra/prefect.yaml``).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from prefect import serve
from prefect.schedules import Cron

from flava.config import load_config
from flava.launch.config import launch_section
from flows.pipeline import flava_pipeline


def build_deployment(params_path: str = "params.yaml"):
    """The scheduled deployment of ``flava_pipeline`` described by ``launch.schedule``."""
    schedule = launch_section(load_config(params_path)).schedule
    return flava_pipeline.to_deployment(
        name=schedule.deployment,
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
        parameters={"params_path": params_path, "sweep": schedule.sweep, "joint_on_k8s": schedule.joint_on_k8s},
        tags=["flava"],
        description="FLAVA pretraining pipeline: data -> encoders -> joint -> evaluate -> promote",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    serve(build_deployment(args.params))


if __name__ == "__main__":
    main()

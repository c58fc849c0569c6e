"""Serve the pipeline flow on its schedule from this process: ``python -m flows.serve`` in the workspace.

The deployment (name, cron, timezone, sweep/joint-on-Kubernetes switches) comes from ``launch.schedule`` in
params.yaml; the Prefect UI shows it, runs it on schedule and lets users start it with other parameters.
For a worker-based setup use ``infra/prefect.yaml`` (``prefect deploy --prefect-file infra/prefect.yaml``): its
deployments have other names, and serving refuses to take over one of them (a served deployment has no work pool
and no pull steps, so the worker's would lose both and its next run could not find the flow code).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from flava.config import load_config
from flava.launch.config import launch_section
from flava.pipeline import PARAMS_FILE
from flows.pipeline import flava_pipeline


class DeploymentClash(RuntimeError):
    """A deployment of the same name exists and belongs to a worker (``prefect deploy``)."""


def check_not_a_worker_deployment(name: str) -> None:
    """Raise DeploymentClash if ``flava-pipeline/<name>`` exists with a work pool or pull steps."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_deployment_by_name(f"{flava_pipeline.name}/{name}")
        except ObjectNotFound:
            return
    if existing.work_pool_name or existing.pull_steps:
        raise DeploymentClash(
            f"deployment {flava_pipeline.name}/{name} already exists as a worker deployment (work pool "
            f"{existing.work_pool_name!r}, {len(existing.pull_steps or [])} pull step(s), from `prefect deploy`); "
            f"serving it would replace it and drop both. Set launch.schedule.deployment to another name "
            f"(infra/prefect.yaml uses flava-weekly and flava-monthly-sweep-k8s) or delete that deployment first.")


def build_deployment():
    """The scheduled deployment of ``flava_pipeline`` described by ``launch.schedule`` of params.yaml."""
    schedule = launch_section(load_config(PARAMS_FILE)).schedule
    return flava_pipeline.to_deployment(
        name=schedule.deployment,
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
        parameters={"sweep": schedule.sweep, "joint_on_k8s": schedule.joint_on_k8s},
        tags=["flava", "served"],
        description="FLAVA pretraining pipeline served by `python -m flows.serve`: data -> encoders -> joint -> "
                    "evaluate -> promote, each stage through `dvc repro`",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    deployment = build_deployment()
    try:
        check_not_a_worker_deployment(deployment.name)
    except DeploymentClash as err:
        raise SystemExit(f"flows.serve: error: {err}") from None
    serve(deployment)


if __name__ == "__main__":
    main()

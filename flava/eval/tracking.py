"""MLflow plumbing for the evaluation and promotion stages: tracking URI, nested stage runs, lineage tags.

The tracking URI is ``$MLFLOW_TRACKING_URI`` when set (a shared server), else ``cfg.tracking.tracking_uri``. A
stage run nests under ``$FLAVA_PARENT_RUN_ID`` (set by ``flava pipeline run``) when present. Importing this module
sets nothing; only :func:`stage_run` talks to MLflow.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from flava.config import PipelineConfig
from flava.tracking import lineage

STAGE_TAG = "flava.stage"  # same key as the pipeline's parent run


def tracking_uri(cfg: PipelineConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri


def lineage_tags(cfg: PipelineConfig, stage: str, root: str | Path = ".") -> dict[str, str]:
    tags = {
        STAGE_TAG: stage,
        "git_commit": lineage.git_commit(root),
        "data_version": lineage.data_version(root),
        "host": lineage.host(),
        "params_hash": cfg.digest(),
    }
    parent = os.environ.get(lineage.PARENT_RUN_ENV)
    if parent:
        tags["parent_run_id"] = parent
    return tags


@contextlib.contextmanager
def stage_run(cfg: PipelineConfig, stage: str, root: str | Path = ".") -> Iterator["object"]:
    """An MLflow run for one stage, tagged with lineage and nested under the pipeline run when there is one."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        experiment_id = mlflow.create_experiment(
            cfg.tracking.experiment, artifact_location=cfg.tracking.artifact_location
        )
    else:
        experiment_id = experiment.experiment_id
    parent = os.environ.get(lineage.PARENT_RUN_ENV) or None
    tags = lineage_tags(cfg, stage, root)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, tags=tags, parent_run_id=parent, nested=parent is not None,
        log_system_metrics=False,
    ) as run:
        yield run

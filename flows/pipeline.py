"""The whole FLAVA recipe as one Prefect flow; every task is one stage function from ``flava`` and nothing more.

    raw data (DVC pull, else generate) -> prepare -> validate -> shard || fit -> pretrain text || image
    -> [sweep] -> joint (local, or a Kubernetes Job) -> evaluate -> promote

Prefect adds what the library leaves out: parameters in the UI, schedules (``infra/prefect.yaml``,
``flows/serve.py``), retries for the steps that can fail transiently (pulls, S3 uploads, training that resumes
from its checkpoints, the registry), concurrency (shard || fit, text || image) and a summary artifact.
Stage runs nest under one MLflow parent run whose id the tasks see in ``$FLAVA_PARENT_RUN_ID``.
Stage modules are imported inside the tasks, so importing this module is cheap.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flava.config import PipelineConfig, load_config
from flava.tracking import lineage

# Stage name -> (module, function); each is ``run_*(cfg) -> dict`` (docs/interfaces.md, stage table).
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("flava.data.ingest", "run_prepare"),
    "validate": ("flava.data.validate", "run_validate"),
    "shard": ("flava.data.shards", "run_shard"),
    "fit": ("flava.data.fit", "run_fit"),
    "pretrain": ("flava.train.stages", "run_pretrain"),
    "sweep": ("flava.launch.sweep", "run_sweep"),
    "joint_k8s": ("flava.launch.k8s", "run_joint"),
    "evaluate": ("flava.eval.run", "run_evaluate"),
    "promote": ("flava.tracking.registry", "run_promote"),
}


def stage(name: str):
    module, function = STAGES[name]
    return getattr(importlib.import_module(module), function)


def transient(task, task_run, state) -> bool:
    """Retry condition: bad input or config (ValueError, FileNotFoundError) fails at once; other errors retry."""
    try:
        state.result()
    except (ValueError, FileNotFoundError):
        return False
    except Exception:
        return True
    return False


def stage_task(name: str, *, run_name: str | None = None, retries: int = 0, retry_delay_s: float = 10):
    """A task for one stage. Stages are deterministic and DVC caches their outputs: Prefect does not cache them
    again (NO_CACHE). Retries only for errors that are not bad input or config (``transient``)."""
    return task(name=name, task_run_name=run_name or name, retries=retries, retry_delay_seconds=retry_delay_s,
                retry_condition_fn=transient, cache_policy=NO_CACHE)


@stage_task("data-version", retries=2, retry_delay_s=30)
def data_version(cfg: PipelineConfig) -> dict[str, Any]:
    """``paths.raw`` in place: kept, pulled from the DVC remote (``data.dvc``), else the synthetic world."""
    from flava.pipeline import ensure_raw_data

    source = ensure_raw_data(cfg, Path.cwd())
    return {"raw_data": source, "data_version": lineage.data_version()}


@stage_task("prepare")
def prepare(cfg: PipelineConfig) -> dict[str, Any]:
    return stage("prepare")(cfg)


@stage_task("validate")
def validate(cfg: PipelineConfig) -> dict[str, Any]:
    return stage("validate")(cfg)


# Retried: S3 uploads can fail transiently.
@stage_task("shard", retries=2)
def shard(cfg: PipelineConfig) -> dict[str, Any]:
    return stage("shard")(cfg)


@stage_task("fit")
def fit(cfg: PipelineConfig) -> dict[str, Any]:
    return stage("fit")(cfg)


# A retried training task resumes from paths.checkpoints/{stage}/.
@stage_task("pretrain", run_name="pretrain-{modality}", retries=1)
def pretrain(cfg: PipelineConfig, modality: str) -> dict[str, Any]:
    return stage("pretrain")(cfg, modality)


# Retried: the study resumes by name from its SQLite storage.
@stage_task("sweep", retries=1)
def sweep_task(cfg: PipelineConfig) -> dict[str, Any]:
    return stage("sweep")(cfg)


# Retried: a new Job resumes from the checkpoints on the shared workspace.
@stage_task("joint-k8s", retries=1, retry_delay_s=60)
def joint_on_kubernetes(cfg: PipelineConfig) -> dict[str, Any]:
    summary = stage("joint_k8s")(cfg)
    joint_report = Path(cfg.paths.reports) / "joint.json"  # written by the pods on the shared workspace
    return dict(summary, joint=json.loads(joint_report.read_text()) if joint_report.exists() else None)


@stage_task("evaluate")
def evaluate(cfg: PipelineConfig) -> dict[str, Any]:
    return stage("evaluate")(cfg)


# Retried: registry lock timeouts and tracking-server hiccups.
@stage_task("promote", retries=2)
def promote(cfg: PipelineConfig) -> dict[str, Any]:
    return stage("promote")(cfg)


def _summary(results: dict[str, Any]) -> str:
    lines = ["# FLAVA pipeline", "", "| step | result |", "|---|---|"]
    for step, value in results.items():
        text = json.dumps(value, default=str, sort_keys=True)
        lines.append(f"| {step} | `{text[:300]}{'…' if len(text) > 300 else ''}` |")
    return "\n".join(lines)


@flow(name="flava-pipeline", log_prints=True)
def flava_pipeline(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    sweep: bool = False,
    joint_on_k8s: bool = False,
) -> dict[str, Any]:
    """Run the recipe end to end. ``overrides`` are ``key.path=value`` strings, as ``flava ... --set`` takes."""
    cfg = load_config(params_path, overrides or [])
    results: dict[str, Any] = {"data": data_version(cfg)}
    tags = {
        "flava.stage": "pipeline",
        "orchestrator": "prefect",
        "prefect.flow_run_id": str(flow_run.id or ""),
        "git_commit": lineage.git_commit(),
        "data_version": results["data"]["data_version"],
        "raw_data": results["data"]["raw_data"],
        "host": lineage.host(),
        "params_hash": cfg.digest(),
    }
    from flava.tracking.runs import parent_run

    with parent_run(cfg, tags) as run_id:
        results["mlflow_parent_run_id"] = run_id
        results["prepare"] = prepare(cfg)
        results["validate"] = validate(cfg)
        shards, artifacts = shard.submit(cfg), fit.submit(cfg)  # both read paths.validated only
        results["shard"], results["fit"] = shards.result(), artifacts.result()
        text, image = pretrain.submit(cfg, "text"), pretrain.submit(cfg, "image")
        results["pretrain_text"], results["pretrain_image"] = text.result(), image.result()
        if sweep:
            from flava.launch.sweep import apply_best

            results["sweep"] = sweep_task(cfg)
            cfg = apply_best(cfg, results["sweep"])
        results["joint"] = joint_on_kubernetes(cfg) if joint_on_k8s else pretrain(cfg, "joint")
        results["evaluate"] = evaluate(cfg)
        results["promote"] = promote(cfg)
    create_markdown_artifact(key="flava-pipeline-summary", markdown=_summary(results),
                             description="results of every stage of this pipeline run")
    return results

"""MLflow runs: the pipeline's parent run, and one run per stage nested under it (``StageRun`` for the training
stages, :func:`stage_run` for the others).

A ``StageRun`` logs the flattened effective config as params, lineage tags (git commit, data version, stage,
world size, host), per-step metrics, the effective config and checkpoint URIs as artifacts, and the final model as
an MLflow pyfunc (``flava/tracking/pyfunc_entry.py``: texts and/or images in, L2-normalised embeddings out) with
a signature, the model-side ``flava`` code and pinned requirements, so the registered model serves in a fresh
environment from the registry alone (README, "Serving the champion").

Only the main rank talks to MLflow; on other ranks every method is a no-op. The tracking URI is
``$MLFLOW_TRACKING_URI`` when set, else ``cfg.tracking.tracking_uri``, a relative SQLite path taken relative to
``$DVC_ROOT`` under DVC (:func:`tracking_uri`). Importing this module sets nothing.
"""
from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml
from PIL import Image

from flava.config import PipelineConfig, flatten
from flava.distributed import ProcessInfo
from flava.stages import import_closure
from flava.tracking import lineage
from flava.workspace import DVC_ROOT_ENV, workspace_root

# mlflow is imported inside the functions that use it ("mlflow: lazy" beside each): it takes ~1.5 s to import,
# and flava.data.loader imports this module (through flava.data.shards), so every spawned DataLoader worker
# (data.loader.start_method "spawn", workers not persistent) would pay that on top of its ~1.8 s start.

log = logging.getLogger(__name__)

STAGE_TAG = "flava.stage"  # the key the evaluation runs and the pipeline's parent run use too
MLFLOW_PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values


DVC_EXP_ENV = "DVC_EXP_NAME"  # DVC sets it for the stages of `dvc exp run`
SQLITE_PREFIX = "sqlite:///"


def tracking_uri(cfg: PipelineConfig) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else ``tracking.tracking_uri``; a relative SQLite path is taken relative
    to ``$DVC_ROOT`` when DVC runs the stage, else to the current directory.

    ``dvc exp run --temp`` runs the stages in a copy under ``.dvc/tmp/exps``: resolved against the current
    directory, ``sqlite:///mlflow.db`` would be a throwaway store there instead of the project's."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    root = os.environ.get(DVC_ROOT_ENV)
    if root and uri.startswith(SQLITE_PREFIX):
        path = uri[len(SQLITE_PREFIX):]  # sqlite:////abs.db -> "/abs.db"; sqlite:///rel.db -> "rel.db"
        if path and path != ":memory:" and not Path(path).is_absolute():
            return SQLITE_PREFIX + str(Path(root).resolve() / path)
    return uri


def artifact_location(cfg: PipelineConfig) -> str | None:
    """Where a new experiment keeps artifacts: ``tracking.artifact_location``, else (under DVC) ``$DVC_ROOT/mlruns``
    -- MLflow's own default is ``./mlruns`` of the creating process, lost with a ``--temp`` experiment's copy."""
    if cfg.tracking.artifact_location or not os.environ.get(DVC_ROOT_ENV):
        return cfg.tracking.artifact_location
    return str(Path(os.environ[DVC_ROOT_ENV]).resolve() / "mlruns")


def experiment_id(client, cfg: PipelineConfig) -> str:
    """The id of ``tracking.experiment`` in ``client``'s store, created when missing (two creators may race)."""
    # mlflow: lazy (see the note at the imports)
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg))
    except MlflowException:
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


# Files of the project root the parent run keeps at its close: what ran (dvc.lock) with which params.
PIPELINE_FILES = ("dvc.lock", "params.yaml")
# Reports whose numbers the parent run logs at its close, with the metric-name prefix each gets.
PIPELINE_REPORTS = (("eval/metrics.json", "eval."), ("joint.json", "joint."))
TRIGGERS = ("cli", "prefect")


@contextmanager
def parent_run(
    cfg: PipelineConfig, tags: Mapping[str, str] | None = None, *, trigger: str = "cli", link: str | None = None,
    root: str | Path = ".",
) -> Iterator[str]:
    """The pipeline's MLflow run, opened here by both the CLI main job and the Prefect flow; yields its id.

    Named ``pipeline <UTC date-time> <git short hash> <trigger>`` (``trigger``: ``cli`` or ``prefect``) and tagged
    with the lineage of :func:`pipeline_tags` plus ``tags``; ``link`` (e.g. the Prefect flow run's URL) becomes the
    ``link`` tag and the run's description. At open it logs the flattened effective config as params; at close,
    success or failure, the numbers of ``<paths.reports>/eval/metrics.json`` and ``joint.json`` as metrics,
    ``dvc.lock`` and ``params.yaml`` of ``root`` and ``<paths.reports>/promotion.json`` as artifacts -- so both
    routes' parent runs hold the same things. ``$FLAVA_PARENT_RUN_ID`` points at it while the body runs, so every
    stage run nests under it. It uses the client API, so no fluent run stays active for the stages to trip on;
    it ends FAILED if the body raises."""
    # mlflow: lazy (see the note at the imports)
    from mlflow import MlflowClient

    if trigger not in TRIGGERS:
        raise ValueError(f"parent_run trigger {trigger!r} must be one of {TRIGGERS}")
    root = Path(root)
    client = MlflowClient(tracking_uri(cfg))
    all_tags = {**pipeline_tags(cfg, root), "trigger": trigger, **(tags or {})}
    if link:
        all_tags.update({"link": link, "mlflow.note.content": f"Started by {trigger}: [{link}]({link})"})
    name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())} " \
           f"{lineage.short_commit(all_tags['git_commit'])} {trigger}"
    run_id = client.create_run(experiment_id(client, cfg), run_name=name, tags=all_tags).info.run_id
    log_params(client, run_id, cfg)
    previous = os.environ.get(lineage.PARENT_RUN_ENV)
    os.environ[lineage.PARENT_RUN_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        try:
            _log_pipeline_outcome(client, run_id, cfg, root)
        except Exception:
            if status == "FINISHED":  # the pipeline worked but its record did not: say so
                status = "FAILED"
                raise
            log.exception("could not log the outcome of failed pipeline run %s", run_id)  # keep the body's error
        finally:
            client.set_terminated(run_id, status)
            if previous is None:
                os.environ.pop(lineage.PARENT_RUN_ENV, None)
            else:
                os.environ[lineage.PARENT_RUN_ENV] = previous


def pipeline_tags(cfg: PipelineConfig, root: str | Path = ".") -> dict[str, str]:
    """Lineage tags of a pipeline run (the stage runs get theirs from :func:`stage_tags`)."""
    return {
        STAGE_TAG: "pipeline",
        "git_commit": lineage.git_commit(root),
        "data_version": lineage.data_version(root),
        "host": lineage.host(),
        "params_hash": cfg.digest(),
    }


def log_params(client, run_id: str, cfg: PipelineConfig) -> None:
    """The flattened effective config as the run's params (MLflow takes at most 100 per batch)."""
    # mlflow: lazy (see the note at the imports)
    from mlflow.entities import Param

    params = [Param(k, param_value(v)) for k, v in cfg.flat().items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])


def _log_pipeline_outcome(client, run_id: str, cfg: PipelineConfig, root: Path) -> None:
    # mlflow: lazy (see the note at the imports)
    from mlflow.entities import Metric

    reports = root / cfg.paths.reports
    metrics: dict[str, float] = {}
    for name, prefix in PIPELINE_REPORTS:
        if (reports / name).is_file():
            metrics.update(numeric_metrics(json.loads((reports / name).read_text()), prefix))
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=batch[start:start + 1000])
    for name in PIPELINE_FILES:
        if (root / name).is_file():
            client.log_artifact(run_id, str(root / name))
    promotion = reports / "promotion.json"
    if promotion.is_file():
        client.log_artifact(run_id, str(promotion))


_METRIC_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def numeric_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested report as MLflow metrics: flattened ``a.b.c`` names (``@`` -> ``_at_``, other
    characters MLflow rejects -> ``_``); booleans and strings are left out."""
    out = {}
    for key, value in flatten(tree, prefix).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[_METRIC_NAME_UNSAFE.sub("_", key.replace("@", "_at_"))] = float(value)
    return out


def stage_tags(cfg: PipelineConfig, stage: str, info: ProcessInfo, root: str | Path = ".") -> dict[str, str]:
    tags = {
        STAGE_TAG: stage,
        "git_commit": lineage.git_commit(root),
        "data_version": lineage.data_version(root),
        "host": lineage.host(),
        "world_size": str(info.world_size),
        "params_hash": cfg.digest(),
    }
    parent = os.environ.get(lineage.PARENT_RUN_ENV)
    if parent:
        tags["parent_run_id"] = parent
    return tags


class StageLog:
    """What :func:`stage_run` yields: logging into one stage's MLflow run through the client API."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "", step: int = 0) -> dict[str, float]:
        """Log the numbers of a (nested) report; returns what was logged."""
        # mlflow: lazy (see the note at the imports)
        from mlflow.entities import Metric

        numbers = numeric_metrics(dict(metrics), prefix)
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in numbers.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])
        return numbers

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A local file, or every file of a local directory, as artifacts (under ``artifact_path``)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, payload: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(payload), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


@contextmanager
def stage_run(cfg: PipelineConfig, stage: str, root: str | Path = ".") -> Iterator[StageLog]:
    """One MLflow run for a stage that is not a training loop (prepare, validate, shard, fit, promote).

    Named after the stage, nested under ``$FLAVA_PARENT_RUN_ID`` when set, tagged like the training stages
    (:func:`stage_tags`) with the flattened effective config as params; ends FAILED with an ``error`` tag if the
    body raises. The client API keeps it apart from any fluent run of the same process (Prefect runs stages in
    threads)."""
    # mlflow: lazy (see the note at the imports)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    tags = stage_tags(cfg, stage, ProcessInfo(), root)
    if tags.get("parent_run_id"):
        tags["mlflow.parentRunId"] = tags["parent_run_id"]  # what the MLflow UI nests by
    run_id = client.create_run(experiment_id(client, cfg), run_name=stage, tags=tags).info.run_id
    log_params(client, run_id, cfg)
    status = "FAILED"
    try:
        yield StageLog(client, run_id)
        status = "FINISHED"
    except BaseException as exc:
        client.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        raise
    finally:
        client.set_terminated(run_id, status)


def param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MLFLOW_PARAM_VALUE_LIMIT]


def checkpoint_locator(uri: str, root: str | Path | None = None) -> str:
    """A checkpoint as a retry on another host finds it: a remote URI (``s3://``) as it is; a local path relative
    to the workspace root (POSIX), which is where it lives in every mount of that workspace (the pods' shared
    volume, the CLI's checkout), else absolute. Resuming never goes through this record: the stage reads
    ``paths.checkpoints`` of the workspace it runs in and resumes only a checkpoint of its own identity."""
    if "://" in uri:
        return uri
    path = Path(uri).resolve()
    base = Path(root).resolve() if root is not None else workspace_root()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


class StageRun:
    """Context manager around one stage's MLflow run. ``run_id`` is None on non-main ranks.

    ``resume_run_id``: the run of the interrupted attempt a resumed stage continues (stored in its checkpoint). It
    is reopened, so the stage's curves stay one history; if the store no longer has it, a new run is started and
    tagged ``resumed_from_run`` with that id."""

    def __init__(self, cfg: PipelineConfig, stage: str, info: ProcessInfo = ProcessInfo(), root: str | Path = ".",
                 resume_run_id: str | None = None):
        self.cfg, self.stage, self.info, self.root = cfg, stage, info, Path(root)
        self.resume_run_id = resume_run_id
        self.active = info.is_main
        self.run_id: str | None = None
        self.checkpoints: list[dict[str, Any]] = []
        self._run = None
        self._stopped: tuple[str, str] | None = None  # (tag, reason): the run ends KILLED, not FAILED

    def __enter__(self) -> "StageRun":
        if not self.active:
            return self
        # mlflow: lazy (see the note at the imports)
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(self.cfg))
        experiment = mlflow.get_experiment_by_name(self.cfg.tracking.experiment)
        experiment_id = (
            experiment.experiment_id if experiment is not None
            else mlflow.create_experiment(self.cfg.tracking.experiment,
                                          artifact_location=self.cfg.tracking.artifact_location)
        )
        parent = os.environ.get(lineage.PARENT_RUN_ENV) or None
        tags = stage_tags(self.cfg, self.stage, self.info, self.root)
        self._run = self._reopen(tags, nested=parent is not None) if self.resume_run_id else None
        if self._run is None:
            if self.resume_run_id:
                tags["resumed_from_run"] = self.resume_run_id
            self._run = mlflow.start_run(
                experiment_id=experiment_id, run_name=f"pretrain_{self.stage}", tags=tags, parent_run_id=parent,
                nested=parent is not None, log_system_metrics=self.cfg.tracking.log_system_metrics,
            )
            mlflow.log_params({k: param_value(v) for k, v in self.cfg.flat().items()})
            mlflow.log_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False),
                            "config/effective.yaml")
        self.run_id = self._run.info.run_id
        return self

    def _reopen(self, tags: dict[str, str], nested: bool):
        """The resumed run reopened (its params stay as first logged: MLflow params are immutable), or None."""
        # mlflow: lazy (see the note at the imports)
        import mlflow

        try:
            previous = mlflow.MlflowClient().get_run(self.resume_run_id)
        except mlflow.exceptions.MlflowException:  # not in this store (deleted for good, or another store)
            return None
        if previous.info.lifecycle_stage != "active":
            return None
        return mlflow.start_run(run_id=self.resume_run_id, tags=tags, nested=nested,
                                log_system_metrics=self.cfg.tracking.log_system_metrics)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active or self._run is None:
            return
        # mlflow: lazy (see the note at the imports)
        import mlflow

        if self.checkpoints:
            mlflow.log_dict({"checkpoints": self.checkpoints}, "checkpoints.json")
        if self._stopped is not None:  # stopped from outside (a pruner, a preemption): not a failure
            tag, reason = self._stopped
            mlflow.set_tag(tag, reason[:5000])
            mlflow.end_run(status="KILLED")
        else:
            if exc is not None:
                mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED" if exc_type is not None else "FINISHED")
        self._run = None

    def stopped(self, reason: str) -> None:
        """The stage is being stopped early (a sweep's pruner): the run ends KILLED, tagged with the reason."""
        self._stopped = ("flava.stopped_early", reason)

    def preempted(self, reason: str) -> None:
        """The stage was stopped by SIGTERM/SIGINT after a checkpoint: the run ends KILLED, tagged
        ``flava.preempted`` with the reason. The resumed stage reopens this run and ends it FINISHED; the tag
        stays as the record of the preemption (``resumed_from_step`` says where it went on)."""
        self._stopped = ("flava.preempted", reason)

    # -------------------------------------------------------------------------------------------- logging
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active or self._run is None:
            return
        # mlflow: lazy (see the note at the imports)
        import mlflow

        mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active and self._run is not None:
            # mlflow: lazy (see the note at the imports)
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_checkpoint(self, step: int, uri: str, **info: Any) -> None:
        """Record where a checkpoint is (logged as ``checkpoints.json`` at the end, and as the latest tag now), in
        a form that means the same on every host: see :func:`checkpoint_locator`. A local one is also tagged with
        the workspace that holds it (``checkpoint.workspace``: host and root directory)."""
        if not self.active or self._run is None:
            return
        where = checkpoint_locator(uri)
        self.checkpoints.append({"step": step, "uri": where, **info})
        tags = {"checkpoint.latest": where}
        if "://" not in where:
            tags["checkpoint.workspace"] = f"{lineage.host()}:{workspace_root()}"
        self.set_tags(tags)

    def log_dict(self, payload: Mapping[str, Any], artifact_file: str) -> None:
        if self.active and self._run is not None:
            # mlflow: lazy (see the note at the imports)
            import mlflow

            mlflow.log_dict(dict(payload), artifact_file)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self.active and self._run is not None:
            # mlflow: lazy (see the note at the imports)
            import mlflow

            mlflow.log_artifacts(str(directory), artifact_path)

    def log_model(
        self, model_dir: str | Path, *, tokenizer_dir: str | Path | None, preprocess: Mapping[str, Any],
        embedding_dim: int, name: str = "model",
    ) -> str | None:
        """Log ``model_dir`` (a ``flava.model.io`` directory) as a pyfunc embedding model; returns its model URI.

        The model carries what it needs to serve where this project is not installed: the ``flava`` modules
        ``pyfunc_entry.py`` imports (code paths) and :func:`serving_requirements`."""
        if not self.active or self._run is None:
            return None
        # mlflow: lazy (see the note at the imports)
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Array, ColSpec, DataType, Schema

        signature = ModelSignature(
            # The image is base64 text, not MLflow's "binary": the scoring server base64-decodes a binary column
            # value by value and fails on the null of a text-only row in a mixed request.
            inputs=Schema([ColSpec(DataType.string, "text", required=False),
                           ColSpec(DataType.string, "image", required=False)]),
            outputs=Schema([ColSpec(Array(DataType.float), "text_embedding", required=False),
                            ColSpec(Array(DataType.float), "image_embedding", required=False)]),
        )
        with tempfile.TemporaryDirectory(prefix="flava-pyfunc-") as tmp:
            staging = Path(tmp)
            (staging / "preprocess.json").write_text(json.dumps(dict(preprocess), indent=2))
            artifacts = {"model": str(model_dir), "preprocess": str(staging / "preprocess.json")}
            if tokenizer_dir is not None:
                artifacts["tokenizer"] = str(tokenizer_dir)
            with warnings.catch_warnings():
                # MLflow 3.17 compares an input example's columns with a range, which pandas deprecates (noise)
                warnings.filterwarnings("ignore", message="Operation with range is deprecated")
                info = mlflow.pyfunc.log_model(
                    name=name, python_model=str(PYFUNC_ENTRY), artifacts=artifacts, signature=signature,
                    input_example=_input_example(tokenizer_dir is not None, int(preprocess["image_size"])),
                    code_paths=[str(_stage_serving_code(staging / "code"))],
                    pip_requirements=serving_requirements(), metadata={"embedding_dim": int(embedding_dim)},
                )
        self.set_tags({"model_uri": info.model_uri})
        return info.model_uri


# ---------------------------------------------------------------------------------------------------- pyfunc
PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")  # builds a FlavaEmbedder (models from code, no pickle)
PYFUNC_MODULE = "flava.tracking.pyfunc_entry"

# The distributions the logged model imports when it loads and predicts (pyfunc_entry.py and the flava modules
# it ships with): mlflow (the pyfunc and the scoring server), pandas (its input), torch, numpy, safetensors and
# pydantic (flava.model), pillow (images), transformers and tokenizers (the tokenizer).
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "pillow",
                         "transformers", "tokenizers")


def serving_requirements() -> list[str]:
    """``SERVING_DISTRIBUTIONS`` pinned to the versions installed here, the ones the model was logged and checked
    with. torch loses its local label (``2.13.0+cpu`` -> ``2.13.0``) so a CUDA or CPU build of it both fit."""
    return [f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" for dist in SERVING_DISTRIBUTIONS]


def serving_modules() -> list[str]:
    """The ``flava`` modules the logged model imports: the import closure of ``pyfunc_entry.py`` (module-level
    imports; by design nothing on its serving path imports a flava module inside a function)."""
    return sorted(import_closure([PYFUNC_MODULE], top_level=True) - {PYFUNC_MODULE})


def _stage_serving_code(directory: Path) -> Path:
    """Copy :func:`serving_modules`' files into ``directory/flava`` (their package layout kept); returns that
    ``flava`` folder, the code path MLflow puts on ``sys.path`` (as ``code/flava``) before loading the model."""
    root = Path(importlib.util.find_spec("flava").origin).parent.parent
    for module in serving_modules():
        source = Path(importlib.util.find_spec(module).origin)
        target = directory / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return directory / "flava"


def _input_example(has_tokenizer: bool, image_size: int):
    """The request the logged model shows in the MLflow UI (MLflow also checks the model serves it): a caption
    row and an image row (a grey PNG at the model's size, base64 as JSON carries it) when the model has a
    tokenizer, else the image row alone."""
    import pandas as pd  # with mlflow, a pipeline extra: imported where a model is logged, like mlflow itself

    png = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(png, format="PNG")
    image = base64.b64encode(png.getvalue()).decode("ascii")
    if has_tokenizer:
        return pd.DataFrame({"text": ["a photo of a red circle", None], "image": [None, image]})
    return pd.DataFrame({"image": [image]})

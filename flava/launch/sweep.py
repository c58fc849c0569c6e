"""Optuna sweep of the joint stage over the corpus sampling ratios and the warm-up (``launch.sweep``).

Each trial is the real joint stage (``flava.train.stages.run_pretrain(cfg, "joint")``) on a config made of the
pipeline's config + ``launch.sweep.trial_overrides`` (short runs) + the sampled values, with its own models,
checkpoints and reports directory (so no trial resumes another's checkpoint or overwrites the pipeline's
model); the unimodal encoders it starts from are linked in. The objective is ``launch.sweep.metric`` of the
stage's result dict (best zero-shot validation top-1).

The study (TPE, seeded) lives in a SQLite file and resumes by name: a re-run completes the trials still missing
up to ``n_trials``. One worker per study: trials left RUNNING by a killed worker are marked failed on resume.
Tracking: one MLflow run for the sweep (nested under ``$FLAVA_PARENT_RUN_ID`` when set) with one nested run per
trial; the trial's own stage run nests under its trial run. ``paths.reports/sweep.json`` holds the best params.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna
from mlflow.tracking import MlflowClient

from flava.config import apply_overrides
from flava.launch.config import SearchParam, SweepConfig, launch_section
from flava.tracking import lineage
from flava.tracking.runs import tracking_uri
from flava.train.stages import run_pretrain

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
UNIMODAL = ("text", "image")  # encoders under paths.models that the joint stage starts from


def run_joint_stage(cfg) -> dict[str, Any]:
    """The joint stage itself (tests replace it with a cheap function of the sampled values)."""
    return run_pretrain(cfg, "joint")


def _lookup(tree: dict[str, Any], key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_space(cfg, space: list[SearchParam]) -> None:
    """Every searched key must name an existing params value (a typo would otherwise sweep nothing)."""
    tree = cfg.model_dump(mode="json")
    missing = [p.key for p in space if not _lookup(tree, p.key)]
    if missing:
        raise ValueError(f"launch.sweep.space keys {missing} are not params keys of this config")


def suggest(trial, space: list[SearchParam]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in space:
        if p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
    return values


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``{"a.b": 1}`` -> ``["a.b=1"]`` (what `--set` and `load_config(..., overrides)` take)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def trial_config(cfg, sweep: SweepConfig, values: dict[str, Any], trial_dir: Path):
    """The config of one trial: short-run overrides, the sampled values, and the trial's own output dirs."""
    paths = {
        "paths.models": str(trial_dir / "models"),
        "paths.checkpoints": str(trial_dir / "checkpoints"),
        "paths.reports": str(trial_dir / "reports"),
    }
    tree = apply_overrides(cfg.model_dump(mode="json"), sweep.trial_overrides)
    tree = apply_overrides(tree, {**values, **paths})
    return type(cfg).model_validate(tree)


def _link_encoders(cfg, trial_dir: Path) -> None:
    models = trial_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in UNIMODAL:
        source, link = Path(cfg.paths.models).resolve() / name, models / name
        if source.exists() and not link.exists():
            link.symlink_to(source, target_is_directory=True)


def _storage_url(path: str) -> str:
    if "://" in path:
        return path
    file = Path(path).resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


class _Tracker:
    """MLflow runs through the client API, so no fluent run is active while a trial's stage opens its own."""

    def __init__(self, cfg):
        uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.tracking.experiment)
        )

    def start(self, name: str, parent: str | None, tags: dict[str, str]) -> str:
        tags = dict(tags)
        if parent:
            tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


@contextmanager
def _parent_env(run_id: str) -> Iterator[None]:
    """Stage runs started inside nest under ``run_id``; the previous parent is restored afterwards."""
    previous = os.environ.get(lineage.PARENT_RUN_ENV)
    os.environ[lineage.PARENT_RUN_ENV] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(lineage.PARENT_RUN_ENV, None)
        else:
            os.environ[lineage.PARENT_RUN_ENV] = previous


def _fail_stale(study) -> int:
    stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def run_sweep(cfg, *, sweep: SweepConfig | None = None) -> dict[str, Any]:
    """Run (or resume) the study until ``n_trials`` trials completed; write ``paths.reports/sweep.json``."""
    sweep = sweep if sweep is not None else launch_section(cfg).sweep
    check_space(cfg, sweep.space)
    study, stale, done = _open_study(cfg, sweep)
    tracker = _Tracker(cfg)
    sweep_run = tracker.start(
        f"sweep-{sweep.study_name}",
        os.environ.get(lineage.PARENT_RUN_ENV),
        {"flava.stage": "sweep", "git_commit": lineage.git_commit(), "data_version": lineage.data_version(),
         "study": sweep.study_name},
    )
    tracker.client.log_param(sweep_run, "sweep.space", json.dumps([p.model_dump() for p in sweep.space]))

    remaining = sweep.n_trials - done
    ok = False
    try:
        if remaining > 0:
            log.info("study %s: %d trial(s) done, running %d more", sweep.study_name, done, remaining)
            # A diverging trial (RuntimeError) fails alone; a config error (ValueError) stops the sweep.
            study.optimize(lambda trial: _run_trial(trial, cfg, sweep, tracker, sweep_run),
                           n_trials=remaining, timeout=sweep.timeout_s, catch=(RuntimeError,))
        summary = report(cfg, sweep, study, stale)
        tracker.client.log_metric(sweep_run, f"best_{sweep.metric}", summary["best_value"])
        for key, value in summary["best_params"].items():
            tracker.client.log_param(sweep_run, f"best.{key}", value)
        tracker.client.log_dict(sweep_run, json.loads(Path(summary["report"]).read_text()), "sweep.json")
        ok = True
        return dict(summary, mlflow_run_id=sweep_run)
    finally:
        tracker.finish(sweep_run, ok)


def _open_study(cfg, sweep: SweepConfig) -> tuple[optuna.Study, int, int]:
    """The study, created or resumed: ``(study, trials marked failed as stale, trials complete)``."""
    study = optuna.create_study(
        study_name=sweep.study_name,
        storage=_storage_url(sweep.storage),
        direction=sweep.direction,
        load_if_exists=True,
    )
    stale = _fail_stale(study)
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    seed = cfg.seed if sweep.seed is None else sweep.seed
    # Offset by the history so a resumed study does not replay the first run's random start-up points.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials), n_startup_trials=sweep.n_startup_trials
    )
    return study, stale, done


def _run_trial(trial: optuna.Trial, cfg, sweep: SweepConfig, tracker: _Tracker, sweep_run: str) -> float:
    """One trial: the joint stage on the trial's config, in its own MLflow run nested under the sweep's."""
    values = suggest(trial, sweep.space)
    trial_dir = Path(sweep.workdir) / sweep.study_name / f"trial-{trial.number:04d}"
    run_id = tracker.start(f"trial-{trial.number}", sweep_run,
                           {"flava.stage": "sweep-trial", "trial": str(trial.number)})
    trial.set_user_attr("mlflow_run_id", run_id)
    ok = False
    try:
        for key, value in values.items():
            tracker.client.log_param(run_id, key, value)
        tcfg = trial_config(cfg, sweep, values, trial_dir)
        _link_encoders(cfg, trial_dir)
        with _parent_env(run_id):
            result = run_joint_stage(tcfg)
        value = _objective_value(result, sweep, trial.number)
        tracker.client.log_metric(run_id, sweep.metric, value)
        ok = True
        return value
    finally:
        tracker.finish(run_id, ok)
        if not sweep.keep_trial_models:
            for sub in ("models", "checkpoints"):
                shutil.rmtree(trial_dir / sub, ignore_errors=True)


def _objective_value(result: dict[str, Any], sweep: SweepConfig, number: int) -> float:
    """``launch.sweep.metric`` of a joint stage's result: ValueError (stops the sweep) if the config cannot give
    it, RuntimeError (fails this trial only) if the run diverged."""
    if sweep.metric not in result:
        raise ValueError(f"launch.sweep.metric {sweep.metric!r} is not in the joint stage's result {sorted(result)}")
    if result[sweep.metric] is None:
        raise ValueError(
            f"the joint stage evaluated nothing ({sweep.metric} is None): keep train.eval_every at most "
            f"train.joint.steps in launch.sweep.trial_overrides"
        )
    value = float(result[sweep.metric])
    if not math.isfinite(value):
        raise RuntimeError(f"trial {number}: {sweep.metric} is {value}")
    return value


def apply_best(cfg, result: dict[str, Any]):
    """``cfg`` with a sweep's best params applied (what the joint stage trains with after a sweep)."""
    return type(cfg).model_validate(apply_overrides(cfg.model_dump(mode="json"), result["best_overrides"]))


def report(cfg, sweep: SweepConfig, study, stale: int = 0) -> dict[str, Any]:
    """Write ``paths.reports/<launch.sweep.report>`` and return its summary."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {sweep.study_name}: no trial completed; see the failed trials' logs")
    best = study.best_trial
    doc = {
        "study": sweep.study_name,
        "storage": sweep.storage,
        "direction": sweep.direction,
        "metric": sweep.metric,
        "n_complete": len(complete),
        "n_failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
        "stale_marked_failed": stale,
        "best": {"number": best.number, "value": best.value, "params": best.params},
        "best_overrides": as_overrides(best.params),
        "trials": [
            {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id")}
            for t in study.trials
        ],
    }
    path = Path(cfg.paths.reports) / sweep.report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return {
        "best_value": best.value,
        "best_params": best.params,
        "best_overrides": doc["best_overrides"],
        "n_complete": len(complete),
        "n_failed": doc["n_failed"],
        "report": str(path),
    }

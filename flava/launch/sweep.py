"""Optuna sweep of the joint stage over the corpus sampling ratios and the warm-up (``launch.sweep``).

Each trial is the real joint stage (``flava.train.stages.run_pretrain(cfg, "joint")``) on a config made of the
pipeline's config + ``launch.sweep.trial_overrides`` (short runs) + the sampled values, with its own models,
checkpoints and reports directory (so no trial resumes another's checkpoint or overwrites the pipeline's
model); the unimodal encoders it starts from are linked in. The objective is ``launch.sweep.metric`` of the
stage's result dict (best zero-shot validation top-1); every zero-shot evaluation on the way is reported to the
trial, and the pruner stops hopeless trials there.

The study lives in an RDB storage (a SQLite file locally, PostgreSQL shared by machines) and resumes by name.
Any number of workers share it: ``workers`` local processes from one ``flava sweep``, or several ``flava sweep``
runs (pods) on one storage. They coordinate only through the storage:

- the budget is the study's: a worker asks for a trial only while fewer than ``n_trials`` count, and a trial
  that a race took beyond the budget is failed at once as surplus (it never runs);
- each trial samples with its own seed (derived from the sweep seed and the trial's number, unique in the study);
- a running trial beats every ``heartbeat_s``; one silent for ``grace_s`` (its worker was killed) is failed and
  retried with the same params (``max_retry``), while the trials of live workers are never touched;
- a worker with nothing left to ask waits for the others' running trials, so a lost trial's retry still runs.

Tracking: one MLflow run for the sweep (nested under ``$FLAVA_PARENT_RUN_ID`` when set) with one nested run per
trial; the trial's own stage run nests under its trial run. ``paths.reports/sweep.json`` and ``plots/`` beside it
hold what the study learned (:mod:`flava.launch.sweep_report`).
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
import sqlalchemy
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from flava.config import apply_overrides
from flava.data.loader import derive_seed
from flava.dburl import check_database_url
from flava.launch.config import SweepConfig, launch_section
from flava.launch.space import applied, apply_best, as_overrides, check_space, suggest  # noqa: F401 (API)
from flava.launch.sweep_report import SURPLUS, report, write_plots
from flava.tracking import lineage
from flava.tracking.runs import tracking_uri
from flava.train.stages import run_pretrain
from flava.train.stop import EarlyStop
from flava.workspace import workspace_root

log = logging.getLogger(__name__)
# Heartbeats and their retry callback are marked experimental in Optuna 5; they are what makes workers safe.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module=r"optuna\..*|flava\..*")

PARENT_TAG = "mlflow.parentRunId"
UNIMODAL = ("text", "image")  # encoders under paths.models that the joint stage starts from

Stage = Callable[..., dict[str, Any]]


def run_joint_stage(cfg, on_eval: Callable[[int, Mapping[str, float]], None] | None = None) -> dict[str, Any]:
    """The joint stage itself; ``on_eval(step, results)`` after each zero-shot evaluation may stop it."""
    return run_pretrain(cfg, "joint", on_eval=on_eval)


def trial_config(cfg, sweep: SweepConfig, params: dict[str, Any], trial_dir: Path):
    """The config of one trial: short-run overrides, the applied params, and the trial's own output dirs."""
    paths = {
        "paths.models": str(trial_dir / "models"),
        "paths.checkpoints": str(trial_dir / "checkpoints"),
        "paths.reports": str(trial_dir / "reports"),
    }
    tree = apply_overrides(cfg.model_dump(mode="json"), sweep.trial_overrides)
    tree = apply_overrides(tree, {**applied(tree, sweep.space, params), **paths})
    return type(cfg).model_validate(tree)


def _link_encoders(cfg, trial_dir: Path) -> None:
    models = trial_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in UNIMODAL:
        source, link = Path(cfg.paths.models).resolve() / name, models / name
        if source.exists() and not link.exists():
            link.symlink_to(source, target_is_directory=True)


# ------------------------------------------------------------------------------------------------ the study
SCHEMA_ATTEMPTS = 5  # tries to open a storage whose schema another worker may be creating at the same moment
SQLITE_URL = "sqlite:///"


def storage_url(storage: str, root: str | Path | None = None) -> str:
    """The study's RDB URL. A file path or a ``sqlite:///`` URL with a relative path is a SQLite file under the
    workspace root (:func:`flava.workspace.workspace_root`), not under the current directory: the CLI, the flow
    and a sweep worker started in another directory of the workspace open the same study."""
    if storage.startswith(SQLITE_URL):
        path = storage[len(SQLITE_URL):]
        if not path or path == ":memory:" or Path(path).is_absolute():
            return storage
    elif "://" in storage:
        check_database_url(storage, "launch.sweep.storage")  # a missing driver named before the study is opened
        return storage
    else:
        path = storage
    file = Path(root).resolve() / path if root is not None else workspace_root() / path
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_URL}{file}"


def _pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.prune_startup_trials,
                                           n_warmup_steps=sweep.prune_after_steps)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, sweep.prune_after_steps))
    return optuna.pruners.NopPruner()


def open_study(sweep: SweepConfig) -> optuna.Study:
    """The study on its storage, with heartbeats, stale-trial retries and the configured pruner."""
    url = storage_url(sweep.storage)
    log.info("optuna study %s on %s (launch.sweep.storage %r)", sweep.study_name, url, sweep.storage)
    # Concurrent workers on one SQLite file wait for its lock rather than failing at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    options = dict(engine_kwargs=engine, heartbeat_interval=sweep.heartbeat_s,
                   grace_period=sweep.grace_s or 2 * sweep.heartbeat_s,
                   heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=sweep.max_retry))
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            storage = RDBStorage(url, **options)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on a fresh PostgreSQL database all create Optuna's schema; all but one
            # fail on a duplicate type or table (CREATE TYPE has no IF NOT EXISTS). The schema is there then.
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    return optuna.create_study(study_name=sweep.study_name, storage=storage, direction=sweep.direction,
                               pruner=_pruner(sweep), load_if_exists=True)


class _TrialSeeded(optuna.samplers.BaseSampler):
    """TPE seeded afresh for each trial from the sweep seed and the trial's number. The storage hands out each
    number once, so no two trials draw with one seed, whichever worker, machine or start runs them -- a seed per
    worker index and history length would repeat for two `flava sweep` runs that open the study at the same
    moment (both worker 0 of an empty history)."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self._seed, self._n_startup = seed, n_startup_trials
        self._tpe = self._for(0)

    def _for(self, number: int) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=derive_seed("sweep", self._seed, number) % 2**32,
                                          n_startup_trials=self._n_startup)

    def before_trial(self, study, trial) -> None:
        self._tpe = self._for(trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


def trial_seeded_sampler(cfg, sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    """The sampler every worker uses (see ``_TrialSeeded``)."""
    return _TrialSeeded(cfg.seed if sweep.seed is None else sweep.seed, sweep.n_startup_trials)


def counts(trial: FrozenTrial, retried: set[int]) -> bool:
    """Whether a trial uses the study's budget: all do but surplus ones and lost ones that were retried."""
    if trial.state != TrialState.FAIL:
        return True
    return trial.number not in retried and trial.user_attrs.get("failure") != SURPLUS


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    retried = {n for t in trials if (n := RetryHeartbeatStaleTrialCallback.retried_trial_number(t)) is not None}
    return [t for t in trials if counts(t, retried)]


IDLE_POLL_S = 1.0  # how often a worker with no trial to run looks at the study (a cheap read)


class _Surplus(Exception):
    """A trial that a race between workers took beyond the budget; failed before it runs."""


# ------------------------------------------------------------------------------------------------ tracking
class _Tracker:
    """MLflow runs through the client API, so no fluent run is active while a trial's stage opens its own."""

    def __init__(self, cfg):
        self.client = MlflowClient(tracking_uri=tracking_uri(cfg))
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.tracking.experiment)
        )

    def start(self, name: str, parent: str | None, tags: dict[str, str]) -> str:
        tags = dict(tags)
        if parent:
            tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def finish(self, run_id: str, state: TrialState | None) -> None:
        """FINISHED for a complete trial, KILLED for a pruned one (tagged as such), FAILED otherwise."""
        if state is not None:
            self.client.set_tag(run_id, "sweep.trial_state", state.name)
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run_id, status)


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


# ------------------------------------------------------------------------------------------------ one trial
class Objective:
    """One trial: the surplus check, its MLflow run, the short joint stage with pruning, its metric."""

    def __init__(self, cfg, sweep: SweepConfig, study: optuna.Study, stage: Stage, tracker: _Tracker,
                 sweep_run: str):
        self.cfg, self.sweep, self.study, self.stage = cfg, sweep, study, stage
        self.tracker, self.sweep_run = tracker, sweep_run
        self.workdir = Path(sweep.workdir) / sweep.study_name
        self.ran = 0  # trials this worker ran (surplus ones excluded)

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.sweep.space)
        before = [t for t in _counted(self.study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(before) >= self.sweep.n_trials:
            trial.set_user_attr("failure", SURPLUS)
            raise _Surplus(f"trial {trial.number}")
        self.ran += 1
        run_id = self.tracker.start(f"trial-{trial.number}", self.sweep_run,
                                    {"flava.stage": "sweep-trial", "trial": str(trial.number)})
        trial.set_user_attr("mlflow_run_id", run_id)
        state = None
        try:
            value = self._run(trial, params, run_id)
            state = TrialState.COMPLETE
            return value
        except optuna.TrialPruned:
            state = TrialState.PRUNED
            raise
        except Exception as err:
            trial.set_user_attr("failure", f"{type(err).__name__}: {err}"[:500])
            raise
        finally:
            self.tracker.finish(run_id, state)
            if not self.sweep.keep_trial_models:
                for sub in ("models", "checkpoints"):
                    shutil.rmtree(self.workdir / f"trial-{trial.number:04d}" / sub, ignore_errors=True)

    def _run(self, trial: optuna.Trial, params: dict[str, Any], run_id: str) -> float:
        trial_dir = self.workdir / f"trial-{trial.number:04d}"
        tcfg = trial_config(self.cfg, self.sweep, params, trial_dir)
        values = applied(tcfg.model_dump(mode="json"), self.sweep.space, params)
        trial.set_user_attr("values", values)
        for key, value in values.items():
            self.tracker.client.log_param(run_id, key, value)
        _link_encoders(self.cfg, trial_dir)

        def on_eval(step: int, results: Mapping[str, float]) -> None:
            key = self.sweep.prune_metric
            if key not in results:
                raise ValueError(f"launch.sweep.prune_metric {key!r} is not in the evaluation's {sorted(results)}")
            value = float(results[key])
            trial.report(value, step)
            if trial.should_prune():
                raise EarlyStop(f"pruned by the {self.sweep.pruner} pruner at step {step} ({value:.4f})")

        try:
            with _parent_env(run_id):
                result = self.stage(tcfg, on_eval)
        except EarlyStop as stop:
            raise optuna.TrialPruned(str(stop)) from None
        return self._metric(trial, result, run_id)

    def _metric(self, trial: optuna.Trial, result: dict[str, Any], run_id: str) -> float:
        metric = self.sweep.metric
        if metric not in result:
            raise ValueError(f"launch.sweep.metric {metric!r} is not in the joint stage's result {sorted(result)}")
        if result[metric] is None:
            raise ValueError(
                f"the joint stage evaluated nothing ({metric} is None): keep train.eval_every at most "
                f"train.joint.steps in launch.sweep.trial_overrides"
            )
        value = float(result[metric])
        if not math.isfinite(value):
            raise RuntimeError(f"trial {trial.number}: {metric} is {value}")
        self.tracker.client.log_metric(run_id, metric, value)
        return value


# ------------------------------------------------------------------------------------------------ workers
def work(cfg, sweep: SweepConfig, *, stage: Stage | None = None,
         sweep_run: str | None = None) -> int:
    """One worker: run trials of the study until its budget is spent and no other worker's trial is running.
    Returns the number of trials this worker ran (surplus ones excluded)."""
    study = open_study(sweep)
    study.sampler = trial_seeded_sampler(cfg, sweep)  # a seed per trial: workers never replay each other's draws
    objective = Objective(cfg, sweep, study, stage or run_joint_stage, _Tracker(cfg), sweep_run or "")
    deadline = time.monotonic() + sweep.timeout_s if sweep.timeout_s else math.inf
    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)  # a lost trial's retry, enqueued
        if waiting or sweep.n_trials - len(_counted(trials)) > 0:
            # A diverging trial (RuntimeError) fails alone; a config error (ValueError) stops the sweep.
            study.optimize(objective, n_trials=1, catch=(RuntimeError, _Surplus))
            continue
        if not any(t.state == TrialState.RUNNING for t in trials):
            break
        # Another worker's trial is running: wait, in case it is lost and retried. Poll more often than the
        # heartbeat so that this worker exits soon after the study's last trial ends.
        time.sleep(min(sweep.heartbeat_s, IDLE_POLL_S))
        optuna.storages.fail_stale_trials(study)
    return objective.ran


def _worker_process(cfg, sweep: SweepConfig, worker: int, threads: int, stage: Stage | None,
                    sweep_run: str) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{worker} %(levelname)s %(message)s")
    with _parent_env(sweep_run):
        work(cfg, sweep, stage=stage, sweep_run=sweep_run)


def _run_workers(cfg, sweep: SweepConfig, workers: int, stage: Stage | None, sweep_run: str,
                 first_worker: int = 0) -> None:
    """``workers`` spawned processes on the study (named ``first_worker`` on in their logs), the threads split."""
    if workers == 1:
        work(cfg, sweep, stage=stage, sweep_run=sweep_run)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no forked torch/MLflow/SQLAlchemy state
    procs = [context.Process(target=_worker_process, args=(cfg, sweep, i, threads, stage, sweep_run),
                             name=f"sweep-worker-{i}") for i in range(first_worker, first_worker + workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = {p.name: p.exitcode for p in procs if p.exitcode != 0}
    if failed:
        raise RuntimeError(f"sweep workers failed (exit codes {failed}); the study resumes by name on a re-run")


def run_sweep(cfg, *, sweep: SweepConfig | None = None, workers: int | None = None,
              stage: Stage | None = None, first_worker: int = 0) -> dict[str, Any]:
    """Run (or resume) the study with ``workers`` processes (default ``launch.sweep.workers``) until its budget
    is spent; write ``paths.reports/sweep.json`` and the study's plots; log both to the sweep's MLflow run.

    ``first_worker``: the index of this run's first worker in log lines when other runs work on the same study
    too, e.g. a pod of the Kubernetes sweep Job (its completion index). Seeds do not depend on it: each trial
    samples with a seed from its own number (``_TrialSeeded``)."""
    sweep = sweep if sweep is not None else launch_section(cfg).sweep
    check_space(cfg, sweep.space)
    open_study(sweep)  # create it (and its tables) once, before workers race to
    tracker = _Tracker(cfg)
    sweep_run = tracker.start(
        f"sweep-{sweep.study_name}", os.environ.get(lineage.PARENT_RUN_ENV),
        {"flava.stage": "sweep", "git_commit": lineage.git_commit(), "data_version": lineage.data_version(),
         "study": sweep.study_name},
    )
    tracker.client.log_param(sweep_run, "sweep.space", json.dumps([p.model_dump() for p in sweep.space]))
    ok = False
    try:
        _run_workers(cfg, sweep, workers or sweep.workers, stage, sweep_run, first_worker)
        summary = _finish(cfg, sweep, tracker, sweep_run)
        ok = True
        return summary
    finally:
        tracker.client.set_terminated(sweep_run, "FINISHED" if ok else "FAILED")


def _finish(cfg, sweep: SweepConfig, tracker: _Tracker, sweep_run: str) -> dict[str, Any]:
    study = open_study(sweep)
    summary = report(cfg, sweep, study, applied_to=cfg.model_dump(mode="json"))
    client = tracker.client
    client.log_metric(sweep_run, f"best_{sweep.metric}", summary["best_value"])
    client.set_tag(sweep_run, "sweep.best_trial_run_id", summary["best_mlflow_run_id"] or "")
    for key, value in summary["best_values"].items():
        client.log_param(sweep_run, f"best.{key}", value)
    client.log_artifact(sweep_run, summary["report"])
    plots = write_plots(study, Path(summary["report"]).parent / "plots")
    for plot in plots:
        client.log_artifact(sweep_run, str(plot), "plots")
    return dict(summary, plots=[str(p) for p in plots], mlflow_run_id=sweep_run)

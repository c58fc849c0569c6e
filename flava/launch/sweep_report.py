"""What a sweep learned, for people: ``sweep.json`` (every trial, the best one, its overrides) and the study's
plots (optimisation history, parallel coordinates, param importances, slices) as PNGs beside it."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on workers and pods

import matplotlib.pyplot as plt
import optuna
import optuna.visualization.matplotlib as optuna_plots
from optuna.trial import TrialState

from flava.launch.space import applied, as_overrides

log = logging.getLogger(__name__)

SURPLUS = "surplus: the study's budget was reached before this trial started"

PLOTS = {
    "optimization_history": optuna_plots.plot_optimization_history,
    "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
    "param_importances": optuna_plots.plot_param_importances,
    "slice": optuna_plots.plot_slice,
    "intermediate_values": optuna_plots.plot_intermediate_values,
}


def _trial_row(t) -> dict[str, Any]:
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "values": t.user_attrs.get("values"), "failure": t.user_attrs.get("failure"),
            "last_step": t.last_step, "mlflow_run_id": t.user_attrs.get("mlflow_run_id")}


def report(cfg, sweep, study: optuna.Study, *, applied_to: dict[str, Any]) -> dict[str, Any]:
    """Write ``paths.reports/<launch.sweep.report>`` and return its summary. ``best_overrides`` are the best
    trial's params applied to ``applied_to`` (the pipeline's config: a warm-up fraction becomes its steps)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {sweep.study_name}: no trial completed; see the failed trials' logs")
    best = study.best_trial
    best_values = applied(applied_to, sweep.space, best.params)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    doc = {
        "study": sweep.study_name, "storage": sweep.storage, "direction": sweep.direction, "metric": sweep.metric,
        "n_trials": sweep.n_trials, "n_complete": len(complete),
        "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "n_failed": sum(t.user_attrs.get("failure") != SURPLUS for t in failed),
        "n_surplus": sum(t.user_attrs.get("failure") == SURPLUS for t in failed),
        # Failed without a recorded reason: lost with their worker (failed by heartbeat).
        "n_lost": sum("failure" not in t.user_attrs for t in failed),
        "trial_steps": sum((t.last_step or 0) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
        "best": {"number": best.number, "value": best.value, "params": best.params, "values": best_values,
                 "mlflow_run_id": best.user_attrs.get("mlflow_run_id")},
        "best_overrides": as_overrides(best_values),
        "trials": [_trial_row(t) for t in trials],
    }
    path = Path(cfg.paths.reports) / sweep.report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return {
        "best_value": best.value, "best_params": best.params, "best_values": best_values,
        "best_overrides": doc["best_overrides"], "best_mlflow_run_id": doc["best"]["mlflow_run_id"],
        "n_complete": len(complete), "n_pruned": doc["n_pruned"], "n_failed": doc["n_failed"],
        "n_lost": doc["n_lost"], "trial_steps": doc["trial_steps"], "report": str(path),
    }


def write_plots(study: optuna.Study, directory: Path) -> list[Path]:
    """The study's plots as PNGs under ``directory``; one that the history cannot support yet (importances
    need two complete trials with varied params) is skipped with the reason logged."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.info("sweep plot %s skipped: %s", name, err)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 5.5)
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written

"""Issue 13 in team mode: two `flava sweep` runs (separate processes, separate checkouts, started together, as on
two machines) on one Optuna study in PostgreSQL, logging to the team's mlflow server. The joint stage is the
sweep unit tests' deterministic stand-in (``tests/unit/test_sweep.py``), so this checks the shared study: the
budget is the study's, no trial runs twice, no params are drawn twice; workers started together on a fresh
database all open the study; a PostgreSQL URL whose driver is missing is named as such."""
from __future__ import annotations

import json
import os

import optuna
import pytest

from flava.config import PipelineConfig
from flava.launch import sweep as sweeplib
from flava.launch.config import SweepConfig
from tests.team import psycopg, run_together
from tests.unit.test_sweep import quick_stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N_TRIALS = 6


def sweep_config(storage: str) -> SweepConfig:
    return SweepConfig(study_name="flava-team-sweep", storage=storage, n_trials=N_TRIALS, n_startup_trials=3,
                       pruner="none", heartbeat_s=1)


def sweeper(storage: str, tracking: str, root: str, barrier, queue) -> None:
    """One `flava sweep` (one local worker) in its own checkout, released together with the other."""
    try:
        os.chdir(root)
        os.environ["MLFLOW_TRACKING_URI"] = tracking
        barrier.wait(timeout=60)
        out = sweeplib.run_sweep(PipelineConfig(), sweep=sweep_config(storage), workers=1, stage=quick_stage)
        queue.put({"n_complete": out["n_complete"], "best_value": out["best_value"]})
    except Exception as err:  # reported to the parent
        queue.put({"error": repr(err)})


def test_two_sweeps_on_one_postgresql_study_share_its_budget_without_repeats(team_postgres, team_mlflow, tmp_path):
    # The same database spelled two ways: plain postgresql:// (SQLAlchemy 2.1 picks psycopg 3) and explicit.
    storages = [team_postgres.url("optuna"), team_postgres.url("optuna", "psycopg", host="localhost")]
    sweeplib.open_study(sweep_config(storages[0]))  # an existing study both resume: they see the same history
    roots = [tmp_path / f"checkout-{i}" for i in range(len(storages))]
    for root in roots:
        root.mkdir()
    results = run_together(sweeper, [(storage, team_mlflow.uri(), str(root)) for storage, root in zip(storages, roots)],
                           timeout_s=400)
    assert all("error" not in r for r in results), results

    study = optuna.load_study(study_name="flava-team-sweep", storage=storages[0])
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == N_TRIALS, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    draws = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(draws)) == N_TRIALS, draws  # each sweep samples with its own seed
    surplus = [t for t in trials if t.user_attrs.get("failure") == sweeplib.SURPLUS]
    assert len(trials) == N_TRIALS + len(surplus)
    # Both sweeps report the one study, and each wrote its report in its own checkout.
    assert {r["n_complete"] for r in results} == {N_TRIALS}
    for i in range(2):
        assert (tmp_path / f"checkout-{i}" / PipelineConfig().paths.reports / "sweep.json").is_file()


def opener(storage: str, barrier, queue) -> None:
    try:
        barrier.wait(timeout=60)
        queue.put(sweeplib.open_study(sweep_config(storage)).study_name)
    except Exception as err:  # reported to the parent
        queue.put(repr(err))


def test_workers_started_together_on_a_fresh_database_all_open_the_study(team_postgres):
    """Each creates Optuna's schema; on PostgreSQL all but one fail on a duplicate type unless they retry."""
    with psycopg.connect(team_postgres.url("postgres"), autocommit=True) as conn:
        conn.execute('CREATE DATABASE "optuna_fresh"')
    opened = run_together(opener, [(team_postgres.url("optuna_fresh"),)] * 3, timeout_s=120)
    assert opened == ["flava-team-sweep"] * 3, opened


def test_a_postgresql_storage_without_its_driver_is_named(tmp_path):
    with pytest.raises(ValueError, match="launch.sweep.storage: postgresql\\+pg8000://u:\\*\\*\\*@db/optuna needs the "
                                         "postgresql driver 'pg8000'"):
        sweeplib.open_study(sweep_config("postgresql+pg8000://u:pw@db/optuna"))

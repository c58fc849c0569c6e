"""The Prefect flow with the REAL stage functions (tiny model, short stages, the synthetic world) and the sweep on,
against a real temporary Prefect server: what a scheduled run does, minus the GPUs. Slow (minutes on 2 CPU
cores): text and image pretraining really run side by side in one process, the sweep really trains, and every
MLflow run nests where it should."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import yaml

from flava.tracking.lineage import PARENT_RUN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import pipeline as pipe  # noqa: E402
from tests.integration.test_flows import server_view  # noqa: E402

TINY = ["model.preset=tiny", "train.text.steps=12", "train.image.steps=12", "train.joint.steps=16",
        "train.eval_every=8", "train.checkpoint_every=8", "train.log_every=4", "tracking.log_system_metrics=false"]


def test_real_pipeline_flow_with_sweep(tmp_path, monkeypatch, project_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    (tmp_path / "params.yaml").write_text((project_root / "params.yaml").read_text())
    overrides = TINY + ["launch.sweep.n_trials=3", "launch.sweep.n_startup_trials=2",
                        'launch.sweep.trial_overrides=["train.joint.steps=16", "train.eval_every=8"]']

    with prefect_test_harness(server_startup_timeout=180):
        state = pipe.flava_pipeline(params_path="params.yaml", overrides=overrides, sweep=True, return_state=True)
        assert state.is_completed(), state
        results = state.result()
        expected = ("data-version", "prepare", "validate", "shard", "fit", "pretrain-text", "pretrain-image",
                    "sweep", "pretrain-joint", "evaluate", "promote")
        run, tasks = server_view(state, expected)

    assert run.state.type.value == "COMPLETED"
    by_name = {t.name: t for t in tasks}
    assert all(by_name[name].state.type.value == "COMPLETED" for name in expected)
    text, image = by_name["pretrain-text"], by_name["pretrain-image"]
    assert text.start_time < image.end_time and image.start_time < text.end_time  # really side by side

    reports = tmp_path / "reports"
    sweep = json.loads((reports / "sweep.json").read_text())
    assert sweep["n_complete"] >= 3 and sweep["best_overrides"]
    for name in ("pretrain_text.json", "pretrain_image.json", "joint.json", "eval/metrics.json", "promotion.json"):
        assert (reports / name).exists(), name
    assert Path("models/joint/best").is_dir()

    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("flava")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parent = results["mlflow_parent_run_id"]
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    by_run_name: dict[str, list] = {}
    for r in runs:
        by_run_name.setdefault(r.info.run_name, []).append(r)
    trial_ids = {r.info.run_id for name, rs in by_run_name.items() if name.startswith("trial-") for r in rs}
    sweep_run = results["sweep"]["mlflow_run_id"]
    assert parent_of[sweep_run] == parent
    assert {parent_of[t] for t in trial_ids} == {sweep_run} and len(trial_ids) == sweep["n_complete"]
    joints = by_run_name["pretrain_joint"]
    # One joint stage run per trial (under its trial run) and the final one under the pipeline run.
    assert sorted(parent_of[r.info.run_id] == parent for r in joints) == [False] * len(trial_ids) + [True]
    for name in ("pretrain_text", "pretrain_image"):
        assert [parent_of[r.info.run_id] for r in by_run_name[name]] == [parent]
    # The final joint stage trained with the sweep's best ratios and warm-up.
    (final,) = [r for r in joints if parent_of[r.info.run_id] == parent]
    for key, value in sweep["best"]["params"].items():
        assert float(final.data.params[key]) == pytest.approx(value), key
    assert client.get_run(parent).info.status == "FINISHED"
    assert os.environ.get(PARENT_RUN_ENV) is None

"""The main job end to end, for real (see conftest.py: a fresh git repo holding the project's files, byte-code
writing on): `flava pipeline run` generates the synthetic raw data because no DVC remote holds it, then runs
`dvc repro` of every stage under an MLflow parent run. Then the checks a user would make: metrics, nested MLflow
runs, the registry champion, that every stage declared what it read, and that a second run is a no-op.

The model is the `tiny` preset with short stages so this runs in a few minutes on 2 CPU cores; the raw data is the
default synthetic world, so it matches the committed `data.dvc`.
"""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from flava import stages
from tests.e2e.conftest import MainJob, dvc_status, run


@pytest.mark.slow
def test_main_job_end_to_end(main_job: MainJob):
    project, first = main_job.repo, main_job.result
    assert first["raw_data"] == "generated"

    # The regenerated synthetic world is byte-identical to what data.dvc records; every stage is recorded.
    assert dvc_status(project) == {}

    # Data stages: counts add up per corpus.
    data_metrics = json.loads((project / "data/validated/metrics.json").read_text())
    for corpus in ("pairs", "images", "text"):
        m = data_metrics[corpus]
        assert m["in"] == m["accepted"] + m["rejected"] and m["accepted"] > 0

    # Every stage's outputs exist; the joint stage kept best beside last.
    for out in ("models/text", "models/image", "models/joint/last", "models/joint/best", "artifacts/tokenizer"):
        assert any((project / out).iterdir()), out
    eval_metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    assert (project / "reports/eval/report.md").read_text().strip()
    assert list((project / "reports/eval/plots").glob("*.png"))

    # MLflow: stage runs nest under the pipeline run; the registry holds a champion or a reasoned challenger.
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    parent_id = first["parent_run_id"]
    experiment = client.get_experiment_by_name("flava")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    ran = {run.data.tags.get("flava.stage") for run in children}
    assert {"text", "image", "joint", "evaluate"} <= ran, ran
    promotion = json.loads((project / "reports/promotion.json").read_text())
    assert promotion["decision"] in {"champion", "challenger"}
    if promotion["decision"] == "champion":
        assert client.get_model_version_by_alias(promotion["model_name"], "champion").version == str(
            promotion["version"]
        )
    else:
        assert promotion["reasons"], "a challenger carries the reasons it was not promoted"
    assert {"vision", "language", "multimodal", "overall"} <= set(eval_metrics["macro"])


@pytest.mark.slow
def test_every_stage_declares_what_it_read(main_job: MainJob):
    """Each stage command recorded the params keys it read and the project modules it loaded: all declared in the
    registry (so in dvc.yaml), else a change to them would not re-run the stage."""
    for stage in stages.STAGES:
        record = main_job.reads / f"{'-'.join(stage.command)}{'-' if len(stage.command) == 1 else ''}.json"
        assert record.exists(), f"{stage.name} did not run under the main job"
        data = json.loads(record.read_text())
        audit = stages.Audit(params=set(data["params"]), modules=set(data["modules"]))
        assert stages.undeclared(stage, audit) == {"params": [], "modules": []}, stage.name


@pytest.mark.slow
def test_second_run_is_a_no_op(main_job: MainJob, workspace):
    """With byte-code written by every command so far (and by `flava --help`), nothing is out of date, and a
    second main job rewrites no output."""
    run(workspace, "flava", "--help")
    assert list(workspace.glob("flava/**/__pycache__")), "byte-code writing should be on in this test"
    assert dvc_status(workspace) == {}
    lock_before = (workspace / "dvc.lock").read_text()
    best = workspace / "models/joint/best"
    mtimes_before = sorted(p.stat().st_mtime_ns for p in best.rglob("*") if p.is_file())
    proc = run(workspace, "flava", "pipeline", "run", "--json")
    second = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    assert second["raw_data"] == "present"
    assert (workspace / "dvc.lock").read_text() == lock_before
    assert sorted(p.stat().st_mtime_ns for p in best.rglob("*") if p.is_file()) == mtimes_before

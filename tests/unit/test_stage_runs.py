"""The tracking URI under DVC, the generic stage run and the pipeline's parent run (real sqlite store in tmp)."""
import json
import os
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flava.config import PipelineConfig
from flava.data.fit import run_fit
from flava.data.ingest import run_prepare
from flava.data.shards import run_shard
from flava.data.synthetic import run_generate
from flava.data.validate import run_validate
from flava.tracking import lineage
from flava.tracking.lineage import PARENT_RUN_ENV
from flava.tracking.runs import numeric_metrics, parent_run, stage_run, tracking_uri
from tests.helpers import tracking_in
from tests.unit.test_synthetic import SMALL


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV, "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    return PipelineConfig.model_validate({
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "art"),
                     "experiment": "t", "log_system_metrics": False},
        "paths": {"reports": str(tmp_path / "reports")}})


def test_relative_sqlite_uri_resolves_against_dvc_root(monkeypatch, tmp_path):
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    cfg = PipelineConfig()
    assert tracking_uri(cfg) == "sqlite:///mlflow.db"  # no DVC: relative to the current directory, as always
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # `dvc exp run --temp` runs in .dvc/tmp/exps/<copy>
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/x.db")
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/sub/x.db"
    for fixed in ("sqlite:////abs/x.db", "http://mlflow:5000", "sqlite:///:memory:"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", fixed)
        assert tracking_uri(cfg) == fixed


def test_stage_run_nests_tags_logs_numbers_and_artifacts(cfg, monkeypatch, tmp_path):
    client = MlflowClient(tracking_uri(cfg))
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp).info.run_id
    monkeypatch.setenv(PARENT_RUN_ENV, parent)
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    with stage_run(cfg, "validate") as run:
        logged = run.log_metrics({"pairs": {"in": 10, "accepted": 9, "reasons": {"image: missing file": 1}},
                                  "ok": True, "root": "data/x"})
        run.log_artifact(report)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "validate"
    assert got.data.tags["mlflow.parentRunId"] == parent and got.data.tags["flava.stage"] == "validate"
    assert {"git_commit", "data_version", "params_hash"} <= set(got.data.tags)
    assert got.data.metrics == logged == {
        "pairs.in": 10.0, "pairs.accepted": 9.0, "pairs.reasons.image_ missing file": 1.0}
    assert len(got.data.params) == len(cfg.flat())
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["report.md"]


def test_stage_run_fails_with_the_error(cfg):
    with pytest.raises(RuntimeError, match="bad rows"):
        with stage_run(cfg, "prepare") as run:
            raise RuntimeError("bad rows")
    got = MlflowClient(tracking_uri(cfg)).get_run(run.run_id)
    assert got.info.status == "FAILED" and "bad rows" in got.data.tags["error"]


def _write_reports(cfg, root):
    reports = root / "reports"
    (reports / "eval").mkdir(parents=True)
    (reports / "eval" / "metrics.json").write_text(json.dumps({"macro": {"overall": 0.5}, "recall@1": 0.25}))
    (reports / "joint.json").write_text(json.dumps({"loss": 1.5, "best_step": 8, "note": "x"}))
    (reports / "promotion.json").write_text(json.dumps({"decision": "champion"}))
    (root / "params.yaml").write_text("seed: 0\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")


@pytest.mark.parametrize("fail", [False, True])
def test_parent_run_logs_params_reports_and_artifacts_on_both_outcomes(cfg, tmp_path, fail):
    _write_reports(cfg, tmp_path)
    url = "http://prefect/flow-runs/flow-run/abc"
    with pytest.raises(RuntimeError) if fail else nullcontext():
        with parent_run(cfg, {"raw_data": "present"}, trigger="prefect", link=url, root=tmp_path) as run_id:
            assert os.environ[PARENT_RUN_ENV] == run_id
            if fail:
                raise RuntimeError("joint diverged")
    client = MlflowClient(tracking_uri(cfg))
    got = client.get_run(run_id)
    assert got.info.status == ("FAILED" if fail else "FINISHED")
    short = lineage.short_commit(lineage.git_commit(tmp_path))
    assert re.fullmatch(rf"pipeline \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ {re.escape(short)} prefect", got.info.run_name)
    assert got.data.tags["trigger"] == "prefect" and got.data.tags["link"] == url
    assert got.data.tags["raw_data"] == "present" and got.data.tags["flava.stage"] == "pipeline"
    assert len(got.data.params) == len(cfg.flat())
    assert got.data.metrics == {"eval.macro.overall": 0.5, "eval.recall_at_1": 0.25, "joint.loss": 1.5,
                                "joint.best_step": 8.0}
    assert {a.path for a in client.list_artifacts(run_id)} == {"dvc.lock", "params.yaml", "promotion.json"}
    assert PARENT_RUN_ENV not in os.environ


def test_parent_run_rejects_an_unknown_trigger(cfg):
    with pytest.raises(ValueError, match="trigger"):
        with parent_run(cfg, trigger="cron"):
            pass


def test_numeric_metrics_and_short_commit():
    assert numeric_metrics({"a": {"R@5": 1}, "b": False, "c": [1]}, "x.") == {"x.a.R_at_5": 1.0}
    assert lineage.short_commit("0123456789abcdef0123456789abcdef01234567-dirty") == "0123456-dirty"
    assert lineage.short_commit("unknown") == "unknown"


def test_data_stages_are_runs_nested_under_the_pipeline_run(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    cfg = PipelineConfig.model_validate({
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "validated", "shards", "artifacts")},
        "model": {"preset": "tiny"}, "tracking": tracking_in(tmp_path),
        "data": {"generate": SMALL, "shards": {"samples_per_shard": 8}, "validation": {"min_accept_fraction": 0.0},
                 "tokenizer": {"vocab_size": 120}, "codebook": {"num_codes": 8, "iters": 2, "sample_images": 16}},
    })
    run_generate(cfg)
    with parent_run(cfg, root=tmp_path) as parent:
        prepared, validated = run_prepare(cfg), run_validate(cfg)
        shards, fit = run_shard(cfg), run_fit(cfg)
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name("flava").experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    by_stage = {r.data.tags["flava.stage"]: r for r in runs}
    assert set(by_stage) == {"prepare", "validate", "shard", "fit"}
    for run in runs:
        assert run.info.status == "FINISHED" and run.info.run_name == run.data.tags["flava.stage"]
        assert {"git_commit", "data_version", "params_hash"} <= set(run.data.tags)
    metrics = {stage: run.data.metrics for stage, run in by_stage.items()}
    assert metrics["prepare"]["pairs.accepted"] == prepared["pairs"]["accepted"]
    assert metrics["validate"]["images.rejected"] == validated["images"]["rejected"]
    assert metrics["shard"]["corpora.text.num_shards"] == shards["corpora"]["text"]["num_shards"]
    assert metrics["shard"]["corpora.pairs.bytes"] == shards["corpora"]["pairs"]["bytes"]
    assert metrics["fit"]["vocab_size"] == fit["vocab_size"] and "codebook_inertia" in metrics["fit"]

    def files(stage, path=None):
        return {a.path for a in client.list_artifacts(by_stage[stage].info.run_id, path)}

    assert files("validate") == {"report.md", "ge"}
    assert files("validate", "ge") == {"ge/pairs.json", "ge/images.json", "ge/text.json"}
    assert files("shard", "index") == {"index/pairs.json", "index/images.json", "index/text.json"}
    assert files("fit") == {"fit.json"}

    # A validation that fails its threshold still records what it found: the reasons and the report.
    row = json.loads((tmp_path / "prepared" / "pairs.jsonl").read_text().splitlines()[0])
    image = Path(row["image"]) if Path(row["image"]).is_absolute() else tmp_path / "prepared" / row["image"]
    image.write_bytes(b"not an image")
    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "validation": cfg.data.validation.model_copy(update={"min_accept_fraction": 1.0})})})
    with pytest.raises(ValueError, match="min_accept_fraction"):
        run_validate(strict)
    failed = client.search_runs([client.get_experiment_by_name("flava").experiment_id],
                                filter_string="attributes.status = 'FAILED'")
    assert [r.data.tags["flava.stage"] for r in failed] == ["validate"]
    assert failed[0].data.metrics["pairs.rejected"] == 1.0
    assert [k for k in failed[0].data.metrics if k.startswith("pairs.reasons.")] == ["pairs.reasons.not an image"]
    assert "report.md" in {a.path for a in client.list_artifacts(failed[0].info.run_id)}

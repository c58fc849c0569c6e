"""MLflow stage runs (sqlite store in tmp): params, tags, nesting, metrics, artifacts, rank gating."""
import base64
import io
import json

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from flava.config import PipelineConfig
from flava.distributed import ProcessInfo
from flava.tracking.lineage import PARENT_RUN_ENV
from flava.tracking.runs import StageRun, _input_example, tracking_uri


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    return PipelineConfig.model_validate({"tracking": {
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts"),
        "experiment": "t", "log_system_metrics": False}})


def test_stage_run_logs_params_tags_metrics_and_nests(cfg, monkeypatch):
    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.create_experiment("t", artifact_location=cfg.tracking.artifact_location)
    with mlflow.start_run(experiment_id=exp, run_name="pipeline") as parent:
        parent_id = parent.info.run_id
    monkeypatch.setenv(PARENT_RUN_ENV, parent_id)
    with StageRun(cfg, "text", ProcessInfo(0, 0, 2)) as run:
        run.log_metrics(1, {"loss": 2.0, "loss_mlm": 2.0, "lr": 1e-3})
        run.log_metrics(2, {"loss": 1.5, "loss_mlm": 1.5, "lr": 9e-4})
        run.log_checkpoint(2, "/ck/step-0000002")
    client = MlflowClient(tracking_uri(cfg))
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["mlflow.parentRunId"] == parent_id
    tags = got.data.tags
    assert tags["flava.stage"] == "text" and tags["world_size"] == "2"
    assert {"git_commit", "data_version", "host", "params_hash"} <= set(tags)
    assert got.data.params["train.joint.batch_size"] == str(cfg.train.joint.batch_size)
    assert got.data.params["train.optimizer.betas"] == json.dumps(list(cfg.train.optimizer.betas))
    assert len(got.data.params) == len(cfg.flat())
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    files = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config", "checkpoints.json"} <= files
    ck = json.loads(mlflow.artifacts.load_text(f"runs:/{run.run_id}/checkpoints.json"))
    assert ck == {"checkpoints": [{"step": 2, "uri": "/ck/step-0000002"}]}


def test_failed_stage_is_marked_failed(cfg):
    with pytest.raises(RuntimeError):
        with StageRun(cfg, "image") as run:
            raise RuntimeError("diverged")
    got = MlflowClient(tracking_uri(cfg)).get_run(run.run_id)
    assert got.info.status == "FAILED" and "diverged" in got.data.tags["error"]


def test_only_rank_zero_logs(cfg):
    with StageRun(cfg, "joint", ProcessInfo(1, 1, 2)) as run:
        run.log_metrics(1, {"loss": 1.0})
        assert run.log_model("nowhere", tokenizer_dir=None, preprocess={}, embedding_dim=4) is None
    assert run.run_id is None
    mlflow.set_tracking_uri(tracking_uri(cfg))
    assert mlflow.get_experiment_by_name("t") is None


def test_environment_tracking_uri_wins(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/other.db"


def test_input_example_fits_what_the_logged_model_can_embed():
    mixed = _input_example(True, 32)  # a caption row and an image row when the model has a tokenizer
    assert mixed["text"][0] == "a photo of a red circle"
    assert mixed["text"].isna().tolist() == [False, True] and mixed["image"].isna().tolist() == [True, False]
    image_only = _input_example(False, 32)  # else the image row alone, a PNG at the model's size in base64
    assert list(image_only.columns) == ["image"] and image_only["image"][0] == mixed["image"][1]
    assert Image.open(io.BytesIO(base64.b64decode(image_only["image"][0]))).size == (32, 32)


def test_checkpoint_locations_mean_the_same_on_every_host(cfg, tmp_path, monkeypatch):
    """A checkpoint under the workspace is recorded relative to its root (as every mount of the workspace sees it)
    with the workspace that holds it; an S3 one as its URI; one outside the workspace as an absolute path."""
    from flava.tracking.lineage import host
    from flava.tracking.runs import checkpoint_locator

    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (root / "sub").mkdir()
    monkeypatch.chdir(root / "sub")  # a stage started below the root records the same location
    assert checkpoint_locator("../checkpoints/joint/step-000008") == "checkpoints/joint/step-000008"
    assert checkpoint_locator("s3://bucket/ck/joint/step-000008") == "s3://bucket/ck/joint/step-000008"
    assert checkpoint_locator(str(tmp_path / "elsewhere" / "step-1")) == str(tmp_path / "elsewhere" / "step-1")
    with StageRun(cfg, "joint") as run:
        run.log_checkpoint(8, str(root / "checkpoints/joint/step-000008"))
    tags = MlflowClient(tracking_uri(cfg)).get_run(run.run_id).data.tags
    assert tags["checkpoint.latest"] == "checkpoints/joint/step-000008"
    assert tags["checkpoint.workspace"] == f"{host()}:{root}"
    with StageRun(cfg, "joint") as run:
        run.log_checkpoint(8, "s3://bucket/ck/joint/step-000008")
    tags = MlflowClient(tracking_uri(cfg)).get_run(run.run_id).data.tags
    assert tags["checkpoint.latest"] == "s3://bucket/ck/joint/step-000008" and "checkpoint.workspace" not in tags

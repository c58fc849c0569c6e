"""Team mode against real servers started on loopback (``tests/team.py``): PostgreSQL 15, an ``mlflow server`` on
it with artifacts in a moto S3 bucket, and a Prefect server on PostgreSQL.

What the pipeline does with tracking, over REST: the parent run and its nested stage runs, artifacts landing in
the bucket, a logged model registered and promoted (``models:/m-...`` sources, which a server accepts only with
the logged model's id), and promotion serialised where the registry is, by a PostgreSQL advisory lock, even for
promoters whose checkouts and spellings of the server's address differ.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect.settings import PREFECT_API_URL, temporary_settings

from flava.config import PipelineConfig
from flava.eval.config import RegistryConfig
from flava.tracking.lineage import PARENT_RUN_ENV
from flava.tracking.registry import promote, promotion_lock, run_promote
from flava.tracking.runs import StageRun, parent_run, stage_run
from flows import pipeline as pipe
from tests.integration.flow_workspace import make_workspace
from tests.integration.test_flows import server_view
from tests.team import psycopg, run_together

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHANCE = {"zeroshot": 0.1, "text_cls": 0.25, "vqa": 0.2}


def metrics(overall: float) -> dict:
    return {"macro": {"overall": overall, "vision": overall, "language": overall, "multimodal": overall},
            "tasks": {"zeroshot": overall, "text_cls": overall, "vqa": overall}, "chance": dict(CHANCE)}


@pytest.fixture
def server(team_mlflow, monkeypatch):
    """The tracking server, with this process's MLflow pointed at it and no parent run inherited."""
    uri = team_mlflow.uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    mlflow.set_tracking_uri(uri)
    return team_mlflow


def logged_model(client: MlflowClient, experiment: str, tmp: Path, parent: str | None = None) -> tuple[str, str]:
    """An evaluation run that logged a model, as MLflow 3's ``log_model`` does -> (run id, ``models:/m-...``)."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    tags = {"flava.stage": "evaluate", "params_hash": "abc"} | ({"mlflow.parentRunId": parent} if parent else {})
    run = client.create_run(exp_id, run_name="evaluate", tags=tags)
    model = client.create_logged_model(exp_id, name="model", source_run_id=run.info.run_id)
    files = tmp / f"model-{model.model_id}"
    files.mkdir(parents=True)
    (files / "MLmodel").write_text(f"artifact_path: model\nmodel_id: {model.model_id}\nflavors: {{}}\n")
    (files / "model.safetensors").write_bytes(b"weights of " + model.model_id.encode())
    client.log_model_artifacts(model.model_id, str(files))
    client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, f"models:/{model.model_id}"


# ------------------------------------------------------------------------------------------- the pipeline's runs
def test_pipeline_runs_nest_under_the_parent_and_their_artifacts_land_in_the_bucket(server, team_postgres, team_s3,
                                                                                     tmp_path, monkeypatch):
    """The parent run and the stage runs as the stages open them (stage_run, StageRun), an evaluation that logged
    a model, and `flava promote` inside the parent run, all through the server."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    cfg = PipelineConfig.model_validate({
        "tracking": {"tracking_uri": server.uri(), "experiment": "flava-team-pipeline"},
        "eval": {"registry": {"model_name": "flava-team-pipeline", "lock_uri": team_postgres.url("mlflow")}},
        "paths": {"reports": str(tmp_path / "reports")},
    })
    (tmp_path / "manifest.jsonl").write_text('{"key": "a"}\n')
    with parent_run(cfg, root=tmp_path) as parent_id:
        with stage_run(cfg, "prepare", tmp_path) as prepare:
            prepare.log_metrics({"rows": {"pairs": 10}})
            prepare.log_artifact(tmp_path / "manifest.jsonl", "manifests")
        with StageRun(cfg, "joint", root=tmp_path) as joint:
            for step in (1, 2):
                joint.log_metrics(step, {"loss/total": 3.0 / step})
            joint.log_checkpoint(2, "s3://elsewhere/ckpt/step-2")
        client = MlflowClient(server.uri())
        eval_run, source = logged_model(client, cfg.tracking.experiment, tmp_path, parent=parent_id)
        reports = tmp_path / "reports"
        (reports / "eval").mkdir(parents=True)
        (reports / "eval" / "metrics.json").write_text(json.dumps(metrics(0.5)))
        (reports / "eval" / "run.json").write_text(json.dumps(
            {"run_id": eval_run, "model_uri": source, "model_dir": "models/joint/best"}))
        (tmp_path / "models" / "joint" / "best").mkdir(parents=True)
        (tmp_path / "models" / "joint" / "best" / "model.safetensors").write_bytes(b"joint weights")
        decision = run_promote(cfg, tmp_path)
    assert decision["decision"] == "champion" and decision["version"] == 1

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["flava.stage"] == "pipeline"
    assert parent.data.metrics["eval.macro.overall"] == pytest.approx(0.5)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    stages = {r.data.tags["flava.stage"]: r for r in children}
    assert set(stages) == {"prepare", "joint", "evaluate", "promote"}
    assert all(r.info.status == "FINISHED" for r in children if r.data.tags["flava.stage"] != "evaluate")
    assert [m.value for m in client.get_metric_history(stages["joint"].info.run_id, "loss_total")] == [3.0, 1.5]
    assert stages["promote"].data.tags["promotion.decision"] == "champion"
    # Every run's artifacts went through the server into the bucket, under the experiment's run folders.
    keys = set(team_s3.keys(f"mlartifacts/{parent.info.experiment_id}/"))
    expected = {
        (parent_id, "params.yaml"), (parent_id, "dvc.lock"), (parent_id, "promotion.json"),
        (stages["prepare"].info.run_id, "manifests/manifest.jsonl"),
        (stages["joint"].info.run_id, "config/effective.yaml"), (stages["joint"].info.run_id, "checkpoints.json"),
        (stages["promote"].info.run_id, "promotion.json"), (eval_run, "registry/metrics.json"),
        (eval_run, "registry/flava-team-pipeline-v1.json"),
    }
    for run_id, path in expected:
        assert f"mlartifacts/{parent.info.experiment_id}/{run_id}/artifacts/{path}" in keys, (run_id, path)
    model_id = source.removeprefix("models:/")
    assert f"mlartifacts/{parent.info.experiment_id}/models/{model_id}/artifacts/model.safetensors" in keys
    aliases = {a: int(v) for a, v in client.get_registered_model("flava-team-pipeline").aliases.items()}
    assert aliases == {"champion": 1}


# ------------------------------------------------------------------------------------------------ registering
def test_a_server_refuses_a_logged_model_source_without_its_id(server, tmp_path):
    """What promotion tripped on: the local store accepts this call, the REST store refuses it."""
    client = MlflowClient(server.uri())
    run_id, source = logged_model(client, "flava-team-refusal", tmp_path)
    client.create_registered_model("flava-team-refusal")
    with pytest.raises(MlflowException, match="model_id"):
        client.create_model_version("flava-team-refusal", source, run_id=run_id)


def test_promote_registers_a_logged_model_and_moves_aliases_over_rest(server, team_postgres, team_s3, tmp_path):
    client = MlflowClient(server.uri())
    rcfg = RegistryConfig(model_name="flava-team-promote", lock_uri=team_postgres.url("mlflow"))
    lock = promotion_lock(server.uri(), rcfg)
    decisions, sources = [], []
    for score in (0.40, 0.50, 0.45):
        run_id, source = logged_model(client, "flava-team-promote", tmp_path)
        result = promote(client, metrics=metrics(score), eval_run_id=run_id, model_source=source, rcfg=rcfg,
                         lock=lock, weights_sha256=f"sha-{run_id}")
        decisions.append(result["decision"])
        sources.append(source)
    assert decisions == ["champion", "champion", "challenger"]
    model = client.get_registered_model(rcfg.model_name)
    assert {a: str(v) for a, v in model.aliases.items()} == {"champion": "2", "previous": "1", "challenger": "3"}
    assert client.get_model_version_by_alias(rcfg.model_name, "champion").source == sources[1]
    # @champion resolves, through the server, to the files of the logged model it was registered from.
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{rcfg.model_name}@champion",
                                                     dst_path=str(tmp_path / "dl")))
    assert (files / "model.safetensors").read_bytes() == b"weights of " + sources[1].removeprefix("models:/").encode()
    # The gate re-read v1's metrics from its evaluation run's artifact, which lives in the bucket.
    assert any(key.endswith("/artifacts/registry/metrics.json") for key in team_s3.keys("mlartifacts/"))


# ------------------------------------------------------------------------------------- concurrent promoters
def checkout(root: Path, tracking: str, lock_uri: str, run_id: str, source: str, score: float) -> PipelineConfig:
    """A project directory with an evaluation's reports and weights, as ``flava promote`` finds them there."""
    (root / "reports" / "eval").mkdir(parents=True)
    (root / "reports" / "eval" / "metrics.json").write_text(json.dumps(metrics(score)))
    (root / "reports" / "eval" / "run.json").write_text(json.dumps(
        {"run_id": run_id, "model_uri": source, "model_dir": "models/joint/best"}))
    (root / "models" / "joint" / "best").mkdir(parents=True)
    (root / "models" / "joint" / "best" / "model.safetensors").write_bytes(f"weights {score}".encode())
    return PipelineConfig.model_validate({
        "tracking": {"tracking_uri": tracking, "experiment": "flava-team-race"},
        "eval": {"registry": {"model_name": "flava-team-race", "lock_uri": lock_uri}},
        "paths": {"reports": str(root / "reports")},
    })


def promoter(cfg: PipelineConfig, root: str, barrier, queue) -> None:
    """One `flava promote` in its own process and checkout, released together with the other one."""
    try:
        os.chdir(root)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # each promoter's own spelling of the server, from its config
        barrier.wait(timeout=60)
        queue.put(run_promote(cfg, root))
    except Exception as err:  # reported to the parent
        queue.put({"error": repr(err)})


def test_concurrent_promoters_with_other_checkouts_and_spellings_never_crown_the_worse(server, team_postgres,
                                                                                       tmp_path):
    client = MlflowClient(server.uri())
    name = "flava-team-race"
    seed = RegistryConfig(model_name=name, lock_uri=team_postgres.url("mlflow"))
    run_id, source = logged_model(client, name, tmp_path)
    first = promote(client, metrics=metrics(0.40), eval_run_id=run_id, model_source=source, rcfg=seed,
                    lock=promotion_lock(server.uri(), seed), weights_sha256="sha-seed")
    assert first["decision"] == "champion" and first["version"] == 1
    # Two candidates, both better than v1; the better one must end as champion whoever runs first. Their
    # checkouts differ, and so do their spellings of the tracking server and of the lock's database.
    better, worse = tmp_path / "checkout-a", tmp_path / "checkout-b"
    cfgs = {}
    for root, host, score in ((better, "localhost", 0.60), (worse, "127.0.0.1", 0.50)):
        cand_run, cand_source = logged_model(client, name, tmp_path)
        cfgs[root] = checkout(root, server.uri(host), team_postgres.url("mlflow", "psycopg", host=host), cand_run,
                              cand_source, score)
    results = run_together(promoter, [(cfgs[root], str(root)) for root in (better, worse)], timeout_s=300)
    assert all("error" not in r for r in results), results
    by_score = {json.loads((root / "reports" / "promotion.json").read_text())["version"]: root for root in cfgs}
    better_version = next(v for v, root in by_score.items() if root == better)
    aliases = {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}
    assert aliases["champion"] == better_version
    # Serialised: exactly one of them was gated against v1, the other against what the first one left.
    compared = sorted(r["compared_to"] for r in results)
    assert compared.count("1") == 1, results
    second = next(r for r in results if r["compared_to"] != "1")
    first_done = next(r for r in results if r["compared_to"] == "1")
    assert second["compared_to"] == str(first_done["version"])
    if first_done["version"] != better_version:  # the worse went first and was replaced: it is @previous now
        assert aliases["previous"] == first_done["version"] and second["decision"] == "champion"
    else:
        assert second["decision"] == "challenger" and aliases["challenger"] == second["version"]


# ------------------------------------------------------------------------------------------------- Prefect
def test_the_flow_runs_on_the_postgresql_prefect_server_and_logs_to_the_mlflow_server(
        team_prefect, server, team_postgres, team_s3, tmp_path, monkeypatch):
    """The project's flow (light stages through the real `dvc repro`, tests/integration/flow_workspace.py)
    recorded by a Prefect server whose database is PostgreSQL, its parent run in the team's MLflow."""
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    for knob in ("FAKE_FAIL", "FAKE_FAIL_CODE", "FAKE_FAIL_ONCE", "FAKE_SLEEP", "FAKE_BARRIER"):
        monkeypatch.delenv(knob, raising=False)
    with temporary_settings(updates={PREFECT_API_URL: team_prefect.api_url}):
        state = pipe.flava_pipeline(return_state=True)
        assert state.is_completed(), state
        flow_run_id = state.state_details.flow_run_id
        run, tasks = server_view(flow_run_id, {"prepare", "promote"})
        result = state.result()
    assert run.state.type.value == "COMPLETED" and {"prepare", "joint", "promote"} <= {t.name for t in tasks}
    # What the server recorded is in PostgreSQL.
    with psycopg.connect(team_postgres.url("prefect")) as conn:
        row = conn.execute("SELECT state_type FROM flow_run WHERE id = %s", (str(flow_run_id),)).fetchone()
    assert row == ("COMPLETED",)
    parent = MlflowClient(server.uri()).get_run(result["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["trigger"] == "prefect"
    assert str(flow_run_id) in parent.data.tags["link"]
    keys = team_s3.keys(f"mlartifacts/{parent.info.experiment_id}/{parent.info.run_id}/")
    assert {k.rsplit("/", 1)[-1] for k in keys} >= {"params.yaml", "dvc.lock", "promotion.json"}

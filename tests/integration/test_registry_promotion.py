"""Promotion against a real sqlite-backed MLflow tracking store + registry in a temporary directory."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from flava.config import PipelineConfig  # noqa: E402
from flava.eval.config import RegistryConfig  # noqa: E402
from flava.cli import main  # noqa: E402
from flava.tracking.registry import (  # noqa: E402
    gate, promote, promotion_lock, run_promote, version_details, version_metrics,
)

RCFG = RegistryConfig(model_name="flava-test", margin=0.01, domain_tolerance=0.02)
CHANCE = {"zeroshot": 0.1, "text_cls": 0.25, "vqa": 0.2}


def _metrics(overall, vision=None, language=None, multimodal=None):
    vision = overall if vision is None else vision
    language = overall if language is None else language
    multimodal = overall if multimodal is None else multimodal
    return {
        "macro": {"overall": overall, "vision": vision, "language": language, "multimodal": multimodal},
        "tasks": {"zeroshot": vision, "text_cls": language, "vqa": multimodal},
        "chance": dict(CHANCE),
    }


def _store(tmp: Path) -> str:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("flava") is None:
        mlflow.create_experiment("flava", artifact_location=str(tmp / "artifacts"))
    return uri


def _eval_run(uri: str, tmp: Path) -> tuple[str, str]:
    """An 'evaluate' run with a model directory logged as artifacts -> (run_id, model source URI)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("flava")
    run = client.create_run(exp.experiment_id, tags={"flava.stage": "evaluate", "params_hash": "abc"})
    model_dir = tmp / f"model-{run.info.run_id}"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, f"{run.info.artifact_uri}/model"


def _promote(uri, tmp, metrics, run=None, rcfg=RCFG, weights=None):
    run_id, source = run or _eval_run(uri, tmp)
    return promote(MlflowClient(uri), metrics=metrics, eval_run_id=run_id, model_source=source, rcfg=rcfg,
                   lock=promotion_lock(uri, rcfg), tags={"git_commit": "deadbeef"},
                   weights_sha256=weights or f"sha-{run_id}")


def _aliases(uri):
    model = MlflowClient(uri).get_registered_model(RCFG.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_first_model_below_chance_is_only_a_challenger(tmp_path):
    uri = _store(tmp_path)
    result = _promote(uri, tmp_path, _metrics(0.3, vision=0.05))
    assert result["decision"] == "challenger" and not result["promoted"]
    assert any("zeroshot" in r for r in result["reasons"])
    assert _aliases(uri) == {"challenger": "1"}


def test_champion_chain_previous_and_challenger_with_reasons(tmp_path):
    uri = _store(tmp_path)
    first = _promote(uri, tmp_path, _metrics(0.40))
    assert first["decision"] == "champion" and first["version"] == 1
    assert _aliases(uri) == {"champion": "1"}

    second = _promote(uri, tmp_path, _metrics(0.45))
    assert second["promoted"] and second["compared_to"] == "1"
    assert _aliases(uri) == {"champion": "2", "previous": "1"}

    # Better overall but the language domain regressed beyond tolerance.
    third = _promote(uri, tmp_path, _metrics(0.50, vision=0.7, language=0.40, multimodal=0.45))
    assert third["decision"] == "challenger"
    assert _aliases(uri) == {"champion": "2", "previous": "1", "challenger": "3"}
    client = MlflowClient(uri)
    v3 = client.get_model_version(RCFG.model_name, "3")
    assert "language" in third["reasons"][0] and version_details(client, v3)["reasons"] == third["reasons"]
    assert "deadbeef" in v3.description and v3.tags["eval_run_id"]
    assert version_metrics(client, v3)["macro"]["language"] == pytest.approx(0.40)


def test_promoting_the_same_run_twice_changes_nothing(tmp_path):
    uri = _store(tmp_path)
    run = _eval_run(uri, tmp_path)
    first = _promote(uri, tmp_path, _metrics(0.4), run=run)
    client = MlflowClient(uri)
    before = (_aliases(uri), [dict(v.tags) for v in client.search_model_versions(f"name='{RCFG.model_name}'")])
    again = _promote(uri, tmp_path, _metrics(0.4), run=run)
    after = (_aliases(uri), [dict(v.tags) for v in client.search_model_versions(f"name='{RCFG.model_name}'")])
    assert again["changed"] is False and first["changed"] is True
    assert again["version"] == first["version"] and again["decision"] == first["decision"]
    assert before == after and len(after[1]) == 1


def test_crash_after_alias_move_is_repaired_without_self_comparison(tmp_path):
    uri = _store(tmp_path)
    run = _eval_run(uri, tmp_path)
    _promote(uri, tmp_path, _metrics(0.4), run=run)
    client = MlflowClient(uri)
    client.delete_model_version_tag(RCFG.model_name, "1", "promotion.decision")  # as if we died before the tag
    again = _promote(uri, tmp_path, _metrics(0.4), run=run)
    assert again["decision"] == "champion" and again["changed"] is True
    assert _aliases(uri) == {"champion": "1"}
    # The same after a champion that replaced another one (its description names what it was compared to).
    second = _eval_run(uri, tmp_path)
    _promote(uri, tmp_path, _metrics(0.5), run=second)
    client.delete_model_version_tag(RCFG.model_name, "2", "promotion.decision")
    repaired = _promote(uri, tmp_path, _metrics(0.5), run=second)
    assert repaired["decision"] == "champion" and repaired["compared_to"] == "1"
    assert client.get_model_version(RCFG.model_name, "2").description.startswith(
        "**champion**: overall macro 0.5000 vs champion v1")


def _check_serialisable(uri, scores):
    """Exactly one champion, and replaying the gate in registration order reproduces every decision."""
    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions(f"name='{RCFG.model_name}'"), key=lambda v: int(v.version))
    assert len(versions) == len(scores)
    aliases = _aliases(uri)
    champion = None
    previous = None
    for v in versions:
        metrics = version_metrics(client, v)
        decision = gate(metrics, version_metrics(client, champion) if champion else None, RCFG)
        expected = "champion" if decision.promote else "challenger"
        assert v.tags["promotion.decision"] == expected, v.version
        if decision.promote:
            previous, champion = champion, v
    assert aliases["champion"] == str(champion.version)
    if previous is not None:
        assert aliases["previous"] == str(previous.version)


def test_concurrent_thread_promotions_leave_one_consistent_champion(tmp_path):
    uri = _store(tmp_path)
    scores = [0.30, 0.42, 0.38, 0.55, 0.50, 0.61]
    runs = [_eval_run(uri, tmp_path) for _ in scores]
    errors = []

    def worker(i):
        try:
            _promote(uri, tmp_path, _metrics(scores[i]), run=runs[i])
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(scores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _check_serialisable(uri, scores)


def _process_worker(uri, tmp, score, run, queue):
    try:
        mlflow.set_tracking_uri(uri)
        queue.put(_promote(uri, Path(tmp), _metrics(score), run=run)["decision"])
    except Exception as err:  # pragma: no cover - reported to the parent
        queue.put(repr(err))


@pytest.mark.slow
def test_concurrent_process_promotions_leave_one_consistent_champion(tmp_path):
    uri = _store(tmp_path)
    scores = [0.35, 0.60, 0.45]
    runs = [_eval_run(uri, tmp_path) for _ in scores]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(uri, str(tmp_path), s, r, queue)) for s, r in zip(scores, runs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    outcomes = [queue.get(timeout=5) for _ in procs]
    assert all(o in ("champion", "challenger") for o in outcomes), outcomes
    _check_serialisable(uri, scores)


def _stage_workspace(tmp_path, monkeypatch, weights=b"weights-1", **registry):
    """A project dir with evaluation reports of a real eval run and the model's weights -> (cfg, uri, run_id)."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "FLAVA_PARENT_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    uri = _store(tmp_path)
    run_id, source = _eval_run(uri, tmp_path)
    cfg = PipelineConfig.model_validate({
        "tracking": {"tracking_uri": uri},
        "eval": {"registry": {"model_name": "flava-stage", **registry}},
        "paths": {"reports": str(tmp_path / "reports")},
    })
    _write_eval_reports(tmp_path, run_id, source, weights)
    return cfg, uri, run_id


def _write_eval_reports(tmp_path, run_id, source, weights, metrics=None):
    model_dir = tmp_path / "models" / "joint" / "best"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.safetensors").write_bytes(weights)
    (tmp_path / "reports" / "eval").mkdir(parents=True, exist_ok=True)
    (tmp_path / "reports" / "eval" / "metrics.json").write_text(json.dumps(metrics or _metrics(0.4)))
    (tmp_path / "reports" / "eval" / "run.json").write_text(json.dumps(
        {"run_id": run_id, "model_uri": source, "model_dir": "models/joint/best"}))


def test_run_promote_writes_promotion_json_and_records_its_run(tmp_path, monkeypatch):
    cfg, uri, run_id = _stage_workspace(tmp_path, monkeypatch)
    (tmp_path / "reports" / "eval" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        run_promote(cfg)
    (tmp_path / "reports" / "eval" / "metrics.json").write_text(json.dumps(_metrics(0.4)))
    result = run_promote(cfg)
    written = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    assert written == result and result["decision"] == "champion" and result["eval_run_id"] == run_id
    client = MlflowClient(uri)
    version = client.get_model_version("flava-stage", "1")
    assert version.source.endswith("/model")
    assert version.tags["weights_sha256"] == hashlib.sha256(b"weights-1").hexdigest()
    assert f"params `{cfg.digest()}`" in version.description
    assert version_details(client, version)["lineage"]["eval_params_hash"] == "abc"
    assert run_promote(cfg)["changed"] is False
    # The promote stage is an MLflow run that records the decision.
    runs = client.search_runs([client.get_experiment_by_name("flava").experiment_id],
                              filter_string="tags.`flava.stage` = 'promote'")
    assert len(runs) == 2 and {r.data.tags["promotion.decision"] for r in runs} == {"champion"}
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"promotion.json"}


def test_version_has_few_tags_and_its_details_in_description_and_artifact(tmp_path):
    uri = _store(tmp_path)
    _promote(uri, tmp_path, _metrics(0.40))
    result = _promote(uri, tmp_path, _metrics(0.35, vision=0.30))
    client = MlflowClient(uri)
    v2 = client.get_model_version(RCFG.model_name, "2")
    assert set(v2.tags) == {"eval_run_id", "weights_sha256", "overall_macro", "promotion.decision",
                            "promotion.compared_to"}
    assert v2.tags["overall_macro"] == "0.3500" and v2.tags["promotion.compared_to"] == "1"
    assert v2.description.startswith("**challenger**: overall macro 0.3500, -0.0500 vs champion v1")
    assert "| zeroshot | 0.3000 | 0.1000 |" in v2.description
    assert all(f"- {reason}" in v2.description for reason in result["reasons"])
    details = version_details(client, v2)
    assert details["metrics"] == _metrics(0.35, vision=0.30) and details["deltas"]["overall"] == pytest.approx(-0.05)


def test_same_weights_from_another_evaluation_reuse_the_version_and_its_decision(tmp_path):
    uri = _store(tmp_path)
    first = _promote(uri, tmp_path, _metrics(0.40), weights="a" * 64)
    # Another evaluation run of the same weights (e.g. the Prefect route re-running every stage), scored higher.
    again = _promote(uri, tmp_path, _metrics(0.60), weights="a" * 64)
    assert again["version"] == first["version"] == 1 and again["decision"] == "champion"
    assert again["changed"] is False
    assert len(MlflowClient(uri).search_model_versions(f"name='{RCFG.model_name}'")) == 1
    other = _promote(uri, tmp_path, _metrics(0.60), weights="b" * 64)
    assert other["version"] == 2 and other["promoted"]


def test_gate_reads_a_champion_registered_by_the_old_code_from_its_tags(tmp_path):
    uri = _store(tmp_path)
    client = MlflowClient(uri)
    run_id, source = _eval_run(uri, tmp_path)
    client.create_registered_model(RCFG.model_name)
    old_tags = {"eval_run_id": run_id, "promotion.decision": "champion", "promotion.reasons": "[]",
                "macro.overall": "0.500000", "macro.vision": "0.500000", "macro.language": "0.500000",
                "macro.multimodal": "0.500000"}
    client.create_model_version(RCFG.model_name, source, run_id=run_id, tags=old_tags)
    client.set_registered_model_alias(RCFG.model_name, "champion", "1")
    worse = _promote(uri, tmp_path, _metrics(0.505))
    assert worse["decision"] == "challenger" and "not better than champion 0.5000" in worse["reasons"][0]
    assert _promote(uri, tmp_path, _metrics(0.52))["promoted"]


def test_unknown_evaluation_run_explains_itself_and_keeps_promotion_json(tmp_path, monkeypatch):
    cfg, uri, _ = _stage_workspace(tmp_path, monkeypatch)
    _write_eval_reports(tmp_path, "0123456789abcdef0123456789abcdef", "runs:/x/model", b"w")  # from another clone
    promotion = tmp_path / "reports" / "promotion.json"
    promotion.write_text('{"decision": "champion", "version": 3}\n')
    with pytest.raises(ValueError) as err:
        run_promote(cfg)
    message = str(err.value)
    assert "0123456789abcdef0123456789abcdef" in message and f"not found in the tracking store {uri}" in message
    assert "MLFLOW_TRACKING_URI" in message and "dvc repro -f evaluate" in message
    assert promotion.read_text() == '{"decision": "champion", "version": 3}\n'
    assert not list(promotion.parent.glob(".promotion.json*"))  # no half-written temporary left


def test_dvc_experiments_leave_the_registry_alone_unless_asked(tmp_path, monkeypatch):
    cfg, uri, run_id = _stage_workspace(tmp_path, monkeypatch)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1a2b3")
    result = run_promote(cfg)
    assert result["decision"] == "skipped" and result["version"] is None and not result["promoted"]
    assert "exp-1a2b3" in result["reasons"][0] and "register_experiments" in result["reasons"][0]
    assert json.loads((tmp_path / "reports" / "promotion.json").read_text()) == result
    assert MlflowClient(uri).search_registered_models() == []
    asked = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "registry": cfg.eval.registry.model_copy(update={"register_experiments": True})})})
    assert run_promote(asked)["decision"] == "champion"


def _cli(tmp_path, *args):
    return main([*args, "--params", str(tmp_path / "params.yaml")])


def test_registry_commands_promote_rollback_and_status_by_hand(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "FLAVA_PARENT_RUN_ID", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    uri = _store(tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"tracking: {{tracking_uri: '{uri}'}}\neval: {{registry: {{model_name: {RCFG.model_name}}}}}\n")
    for score in (0.40, 0.50, 0.45):  # v1 champion, v2 champion (v1 previous), v3 challenger
        _promote(uri, tmp_path, _metrics(score))
    client = MlflowClient(uri)
    capsys.readouterr()

    # The gate holds by hand too: v3 is worse than the champion, so nothing changes without --force.
    assert _cli(tmp_path, "registry", "promote", "3", "--reason", "looks fine") == 2
    assert "does not pass the gate" in capsys.readouterr().err
    assert _aliases(uri) == {"champion": "2", "previous": "1", "challenger": "3"}
    assert _cli(tmp_path, "registry", "promote", "3", "--reason", "vision matters more now", "--force") == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["action"] == "promote --force" and forced["gate_passed"] is False
    assert _aliases(uri) == {"champion": "3", "previous": "2"}
    v3 = client.get_model_version(RCFG.model_name, "3")
    assert v3.tags["promotion.reason"] == "vision matters more now" and v3.tags["promotion.decision"] == "champion"
    assert "gate BYPASSED with --force" in v3.description and "vision matters more now" in v3.description

    assert _cli(tmp_path, "registry", "rollback", "--reason", "serving errors") == 0
    back = json.loads(capsys.readouterr().out)
    assert back["champion_version"] == 2 and back["rolled_back_version"] == 3 and back["previous_version"] == 1
    assert _aliases(uri) == {"champion": "2", "previous": "1"}
    v3 = client.get_model_version(RCFG.model_name, "3")
    assert v3.tags["promotion.decision"] == "rolled_back" and "serving errors" in v3.description

    assert _cli(tmp_path, "registry", "status") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["aliases"] == {"champion": 2, "previous": 1}
    rows = {row["version"]: row for row in status["versions"]}
    assert rows[2]["aliases"] == ["champion"] and rows[2]["reason"] == "serving errors"
    assert rows[3]["decision"] == "rolled_back" and rows[1]["overall_macro"] == "0.4000"
    assert "not better than champion" in rows[3]["gate_reasons"][0] and rows[1]["gate_reasons"] == []

    # The same lock as `flava promote`: a held lock blocks a manual promotion.
    (tmp_path / "params.yaml").write_text(
        f"tracking: {{tracking_uri: '{uri}'}}\n"
        f"eval: {{registry: {{model_name: {RCFG.model_name}, lock_timeout_s: 0.2}}}}\n")
    with promotion_lock(uri, RCFG).hold(timeout_s=5):
        with pytest.raises(TimeoutError, match="still held"):
            _cli(tmp_path, "registry", "promote", "3", "--reason", "x", "--force")
    assert _aliases(uri) == {"champion": "2", "previous": "1"}

"""Promotion against a real sqlite-backed MLflow tracking store + registry in a temporary directory."""
from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from flava.config import PipelineConfig  # noqa: E402
from flava.eval.config import RegistryConfig  # noqa: E402
from flava.tracking.registry import gate, lock_path, metrics_from_tags, promote, run_promote  # noqa: E402

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


def _promote(uri, tmp, metrics, run=None, rcfg=RCFG):
    run_id, source = run or _eval_run(uri, tmp)
    return promote(MlflowClient(uri), metrics=metrics, eval_run_id=run_id, model_source=source, rcfg=rcfg,
                   lock_file=lock_path(uri, rcfg), tags={"git_commit": "deadbeef"})


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
    assert "language" in json.loads(v3.tags["promotion.reasons"])[0]
    assert v3.tags["git_commit"] == "deadbeef" and v3.tags["eval_run_id"]
    assert metrics_from_tags(v3.tags)["macro"]["language"] == pytest.approx(0.40)


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


def _check_serialisable(uri, scores):
    """Exactly one champion, and replaying the gate in registration order reproduces every decision."""
    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions(f"name='{RCFG.model_name}'"), key=lambda v: int(v.version))
    assert len(versions) == len(scores)
    aliases = _aliases(uri)
    champion = None
    previous = None
    for v in versions:
        metrics = metrics_from_tags(v.tags)
        decision = gate(metrics, metrics_from_tags(champion.tags) if champion else None, RCFG)
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


def test_run_promote_writes_promotion_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FLAVA_PARENT_RUN_ID", raising=False)
    uri = _store(tmp_path)
    run_id, source = _eval_run(uri, tmp_path)
    cfg = PipelineConfig.model_validate({
        "tracking": {"tracking_uri": uri},
        "eval": {"registry": {"model_name": "flava-stage"}},
        "paths": {"reports": str(tmp_path / "reports")},
    })
    (tmp_path / "reports" / "eval").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        run_promote(cfg)
    (tmp_path / "reports" / "eval" / "metrics.json").write_text(json.dumps(_metrics(0.4)))
    (tmp_path / "reports" / "eval" / "run.json").write_text(json.dumps({"run_id": run_id, "model_uri": source}))
    result = run_promote(cfg)
    written = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    assert written == result and result["decision"] == "champion" and result["eval_run_id"] == run_id
    version = MlflowClient(uri).get_model_version("flava-stage", "1")
    assert version.tags["params_hash"] == cfg.digest()
    assert version.tags["eval_params_hash"] == "abc"
    assert version.source.endswith("/model")
    assert run_promote(cfg)["changed"] is False

"""`flava evaluate` then `flava promote` end to end on the real formats: the synthetic generator's eval sets
(through `flava data prepare`), a fitted WordPiece tokenizer, the tiny FLAVA model saved with flava.model.io,
and a sqlite-backed MLflow store with registry in a temporary directory."""
from __future__ import annotations

import hashlib
import json

import pytest
import yaml

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from flava.cli import main  # noqa: E402
from flava.config import load_config  # noqa: E402
from flava.data.ingest import run_prepare  # noqa: E402
from flava.data.synthetic import run_generate  # noqa: E402
from flava.data.tokenizer import fit_wordpiece  # noqa: E402
from flava.model import FlavaForPretraining  # noqa: E402
from flava.model.io import save_model  # noqa: E402
from flava.tracking.registry import version_details  # noqa: E402

PARAMS = {
    "seed": 0,
    "data": {"generate": {
        "image_size": 32, "colours": ["red", "green", "blue"], "shapes": ["circle", "square"], "max_count": 1,
        "pairs": 4, "images_per_class": 1, "text_passages": 2, "text_files": 1,
        "zeroshot_per_class": {"train": 3, "val": 1, "test": 2}, "retrieval_images": 8, "retrieval_captions": 5,
        "text_cls": {"train": 12, "val": 6, "test": 8}, "vqa": {"train": 12, "val": 6, "test": 8},
    }},
    "model": {"preset": "tiny"},
    "eval": {
        "batch_size": 16,
        "probe": {"c_grid": [0.1, 1.0], "max_iter": 200},
        "text_finetune": {"epochs": 1, "batch_size": 8},
        "multimodal_finetune": {"epochs": 1, "batch_size": 8},
        "retrieval": {"query_chunk": 3, "key_chunk": 7, "curve_max_k": 10},
        "registry": {"model_name": "flava-e2e"},
        "plot_dpi": 40,
    },
    "tracking": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "flava-test"},
}


@pytest.mark.slow
def test_evaluate_then_promote_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FLAVA_PARENT_RUN_ID", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    cfg = load_config("params.yaml")
    run_generate(cfg)
    run_prepare(cfg)

    eval_root = tmp_path / cfg.paths.prepared / "eval"
    texts = [c for line in (eval_root / "retrieval" / "test.jsonl").read_text().splitlines()
             for c in json.loads(line)["captions"]]
    texts += [line.split("\t")[0] for line in (eval_root / "text_cls" / "train.tsv").read_text().splitlines()[1:]]
    best = tmp_path / cfg.paths.models / "joint" / "best"
    tok = fit_wordpiece(texts, 120, best / "tokenizer")
    model = FlavaForPretraining(cfg.model.build(vocab_size=len(tok)))
    save_model(model, best)

    # Stage runs nest under the pipeline's parent run.
    client = MlflowClient("sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("flava-test").experiment_id  # created by the prepare stage's run
    parent = client.create_run(experiment, tags={"flava.stage": "pipeline"}).info.run_id
    monkeypatch.setenv("FLAVA_PARENT_RUN_ID", parent)

    assert main(["evaluate"]) == 0
    out = tmp_path / cfg.paths.reports / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"zeroshot", "retrieval_i2t", "retrieval_t2i", "linear_probe", "text_cls", "vqa"}
    assert set(metrics["macro"]) == {"vision", "language", "multimodal", "overall"}
    assert metrics["chance"]["zeroshot"] == pytest.approx(1 / 6)
    for name in ("tasks.png", "retrieval_recall.png", "zeroshot_confusion.png"):
        assert (out / "plots" / name).stat().st_size > 0
    assert "Macro averages" in (out / "report.md").read_text()
    assert (out / "report.html").read_text().startswith("<!doctype html>")

    run_id = json.loads((out / "run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["flava.stage"] == "evaluate"
    assert run.data.tags["params_hash"] == cfg.digest()
    assert run.data.metrics["macro.overall"] == pytest.approx(metrics["macro"]["overall"])
    assert "report" in {a.path for a in client.list_artifacts(run_id)}

    assert main(["promote"]) == 0
    promotion = json.loads((tmp_path / cfg.paths.reports / "promotion.json").read_text())
    assert promotion["version"] == 1 and promotion["eval_run_id"] == run_id
    assert promotion["decision"] in ("champion", "challenger")  # an untrained model may not beat chance
    version = client.get_model_version("flava-e2e", "1")
    assert version.tags["promotion.decision"] == promotion["decision"]
    lineage = version_details(client, version)["lineage"]
    assert lineage["params_hash"] == cfg.digest() and lineage["parent_run_ids"] == parent
    assert version.tags["eval_run_id"] == run_id
    assert version.tags["weights_sha256"] == hashlib.sha256((best / "model.safetensors").read_bytes()).hexdigest()
    # The registered version is the evaluate run's pyfunc embedding model, loadable from the registry.
    import mlflow

    embedder = mlflow.pyfunc.load_model("models:/flava-e2e/1")
    # The model's code copy (serving modules only) must not shadow this process's flava in spawned children
    # (DataLoader workers): a child imports the full package.
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_import_pipeline_config)
    child.start()
    child.join(120)
    assert child.exitcode == 0
    import pandas as pd

    emb = embedder.predict(pd.DataFrame({"text": ["a photo of a red circle."]}))["text_embedding"][0]
    assert emb.shape == (model.config.projection_dim,)
    assert abs(float((emb**2).sum()) - 1.0) < 1e-4
    # Promoting the same evaluation again changes nothing.
    assert main(["promote"]) == 0
    again = json.loads((tmp_path / cfg.paths.reports / "promotion.json").read_text())
    assert again["changed"] is False and again["version"] == 1


def _import_pipeline_config() -> None:
    """Run in a spawned child: the pipeline side of flava (never shipped with a logged model) imports."""
    import flava.config  # noqa: F401

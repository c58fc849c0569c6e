"""`flava export-hf` writes a transformers-loadable directory with our model card (data, params, metrics)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from flava.cli import main  # noqa: E402
from flava.config import load_config  # noqa: E402
from flava.eval.model_card import build_model_card  # noqa: E402
from flava.model import FlavaForPretraining  # noqa: E402
from flava.model.io import save_model  # noqa: E402
from tests.unit.test_eval_fakes import make_tokenizer  # noqa: E402

METRICS = {
    "tasks": {"zeroshot": 0.61, "text_cls": 0.8, "vqa": 0.4},
    "chance": {"zeroshot": 0.04, "text_cls": 0.25, "vqa": 0.1},
    "macro": {"vision": 0.61, "language": 0.8, "multimodal": 0.4, "overall": 0.6033},
}


def _setup(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "seed": 3}))
    cfg = load_config(tmp_path / "params.yaml")
    best = tmp_path / "models" / "joint" / "best"
    tok = make_tokenizer(tmp_path / "tok")
    tok.save_pretrained(str(best / "tokenizer"))
    torch.manual_seed(0)
    model = FlavaForPretraining(cfg.model.build(vocab_size=len(tok)))
    save_model(model, best)
    return cfg, best, model


def test_model_card_holds_lineage_params_and_metrics(tmp_path):
    cfg, best, _ = _setup(tmp_path)
    card = build_model_card(cfg, best, root=tmp_path)
    assert "Not evaluated yet" in card
    (tmp_path / "reports" / "eval").mkdir(parents=True)
    (tmp_path / "reports" / "eval" / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "reports" / "eval" / "run.json").write_text(json.dumps({"run_id": "abc123"}))
    card = build_model_card(cfg, best, root=tmp_path)
    assert "| zeroshot | vision | 0.6100 | 0.0400 |" in card
    assert "overall 0.6033" in card and "`abc123`" in card
    assert cfg.digest() in card and "preset `tiny`" in card
    assert "| image | 2 | 32 | 2 |" in card  # tiny preset's image tower


def test_export_hf_cli_writes_a_loadable_directory_with_our_card(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, best, model = _setup(tmp_path)
    (tmp_path / "reports" / "eval").mkdir(parents=True)
    (tmp_path / "reports" / "eval" / "metrics.json").write_text(json.dumps(METRICS))
    assert main(["export-hf", "--out", "export"]) == 0
    out = tmp_path / "export"
    card = (out / "README.md").read_text()
    assert "| vqa | multimodal | 0.4000 | 0.1000 |" in card
    hf = transformers.FlavaModel.from_pretrained(str(out)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.eval().image_features(pixels)
        theirs = hf.image_model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS after the final LayerNorm
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert main(["export-hf", "--model-dir", "missing"]) == 2

"""evaluate_model over all tasks with the oracle model: metrics layout, macro averages, chance, plots, report."""
from __future__ import annotations

import json

import pytest

from flava.eval.aggregate import macro_averages, majority_rate
from flava.eval.config import EvalConfig
from flava.eval.report import write_reports
from flava.eval.run import evaluate_model, write_plots
from tests.unit.test_eval_fakes import COLOURS, OracleModel, make_tokenizer, to_tensor, write_eval_root

FAST = {
    "text_finetune": {"epochs": 10, "batch_size": 8, "lr": 1e-3, "head_lr": 5e-2, "dropout": 0.0},
    "multimodal_finetune": {"epochs": 15, "batch_size": 8, "lr": 1e-3, "head_lr": 5e-2, "dropout": 0.0},
    "probe": {"c_grid": [0.1, 1.0]},
    "retrieval": {"curve_max_k": 8},
}


def test_macro_is_mean_of_domain_means():
    macro = macro_averages({"zeroshot": 0.2, "linear_probe": 0.4, "text_cls": 0.9, "vqa": 0.5,
                            "retrieval_i2t": 0.6, "retrieval_t2i": 0.7})
    assert macro["vision"] == pytest.approx(0.3)
    assert macro["multimodal"] == pytest.approx(0.6)
    assert macro["overall"] == pytest.approx((0.3 + 0.9 + 0.6) / 3)
    assert set(macro_averages({"text_cls": 0.5})) == {"language", "overall"}
    with pytest.raises(ValueError, match="unknown tasks"):
        macro_averages({"imagenet": 0.5})


def test_majority_rate():
    assert majority_rate(["a", "b", "a", "c"]) == 0.5
    assert majority_rate(["a", "b", "a", "c"], top=2) == 0.75


def test_evaluate_model_all_tasks_then_report(tmp_path):
    root = write_eval_root(tmp_path / "eval", per_class=4)
    tok = make_tokenizer(tmp_path / "tok")
    ecfg = EvalConfig.model_validate(FAST)
    metrics, extras = evaluate_model(OracleModel(tok), tok, root, ecfg, transform=to_tensor, device="cpu", max_length=16)
    assert set(metrics["tasks"]) == {"zeroshot", "retrieval_i2t", "retrieval_t2i", "linear_probe", "text_cls", "vqa"}
    assert metrics["zeroshot"]["top1"] == 1.0 and "attributes" not in metrics["zeroshot"]  # none in the set
    assert metrics["chance"]["zeroshot"] == pytest.approx(1 / len(COLOURS))
    assert metrics["retrieval"]["i2t_r1"] == 1.0 and metrics["retrieval"]["t2i_r10"] == 1.0
    assert metrics["chance"]["retrieval_t2i"] == pytest.approx((1 + 5 + 6) / 6 / 3)  # K capped at 6 images
    assert metrics["linear_probe"]["accuracy"] == 1.0
    for task, score in metrics["tasks"].items():
        assert score > metrics["chance"][task], task
    assert metrics["macro"]["overall"] == pytest.approx(
        sum(metrics["macro"][d] for d in ("vision", "language", "multimodal")) / 3)
    json.dumps(metrics)  # serialisable as is

    plots = write_plots(tmp_path / "out", metrics, extras, dpi=40)
    assert set(plots) == {"Tasks vs chance", "Retrieval recall curves", "Zero-shot confusion matrix"}
    for rel in plots.values():
        assert (tmp_path / "out" / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = write_reports(tmp_path / "out", metrics, {"model": "oracle"}, plots)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| zeroshot | vision | 1.0000 |" in md and "plots/tasks.png" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<table>" in html and "<img" in html and written["html"].endswith("report.html")


def test_disabled_tasks_are_left_out_and_all_disabled_is_an_error(tmp_path):
    root = write_eval_root(tmp_path / "eval", per_class=2)
    tok = make_tokenizer(tmp_path / "tok")
    only_zs = EvalConfig.model_validate({
        "retrieval": {"enabled": False}, "probe": {"enabled": False},
        "text_finetune": {"enabled": False}, "multimodal_finetune": {"enabled": False},
    })
    metrics, _ = evaluate_model(OracleModel(tok), tok, root, only_zs, transform=to_tensor, device="cpu", max_length=16)
    assert set(metrics["tasks"]) == {"zeroshot"} and set(metrics["macro"]) == {"vision", "overall"}
    none = only_zs.model_copy(update={"zeroshot": only_zs.zeroshot.model_copy(update={"enabled": False})})
    with pytest.raises(ValueError, match="disabled"):
        evaluate_model(OracleModel(tok), tok, root, none, transform=to_tensor, device="cpu", max_length=16)

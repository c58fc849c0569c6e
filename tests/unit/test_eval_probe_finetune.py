"""Linear probe (L-BFGS, C swept on val) and the text / multimodal fine-tunes on copies of the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flava.eval import finetune
from flava.eval.config import FinetuneConfig, ProbeConfig, TextFinetuneConfig
from flava.eval.datasets import TextSet, load_text_cls, load_vqa
from flava.eval.finetune import Selection, finetune_multimodal, finetune_text, text_task_kind
from flava.eval.probe import evaluate_linear_probe, linear_probe
from tests.unit.test_eval_fakes import COLOURS, OracleModel, make_tokenizer, to_tensor, write_eval_root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return write_eval_root(root / "eval", per_class=4), make_tokenizer(root / "tok")


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_probe_on_oracle_features_is_perfect_and_model_untouched(world):
    root, tok = world
    model = OracleModel(tok)
    before = _snapshot(model)
    out = evaluate_linear_probe(model, root, ProbeConfig(c_grid=[0.1, 1.0]), transform=to_tensor,
                                batch_size=8, device="cpu")
    assert out["accuracy"] == 1.0
    assert out["best_c"] in (0.1, 1.0) and set(out["sweep"]) == {"0.1", "1"}
    assert _unchanged(model, before)


def test_probe_sweep_picks_the_c_that_wins_on_val():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)

    def split(n):  # two noisy classes in 50 dims, one informative dimension
        y = rng.integers(0, 2, n)
        x = rng.normal(0, 1, (n, 50))
        x[:, 0] += 1.5 * (2 * y - 1)
        return x, y

    train, val, test = split(30), split(200), split(400)
    grid = [1e-4, 1e-2, 1.0, 1e3]
    cfg = ProbeConfig(c_grid=grid, standardize=False, refit_on_train_val=False)
    out = linear_probe(train, val, test, cfg)
    sweep = [out["sweep"][f"{c:g}"] for c in grid]
    assert max(sweep) - min(sweep) > 0.1  # the regularisation matters in this world
    assert out["best_c"] == grid[int(np.argmax(sweep))]
    ref = LogisticRegression(C=out["best_c"], solver="lbfgs", max_iter=cfg.max_iter).fit(*train)
    assert out["accuracy"] == pytest.approx(float((ref.predict(test[0]) == test[1]).mean()))
    assert out["accuracy"] > 0.7


def test_probe_on_noise_stays_near_chance():
    rng = np.random.default_rng(1)
    data = [(rng.normal(size=(n, 8)), rng.integers(0, 4, n)) for n in (200, 100, 400)]
    out = linear_probe(*data, ProbeConfig(c_grid=[0.01, 1.0]))
    assert abs(out["accuracy"] - 0.25) < 0.1


def test_probe_rejects_bad_inputs():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="val split"):
        linear_probe((x, y), (x, y[:3]), (x, y), ProbeConfig())
    with pytest.raises(ValueError, match="NaN"):
        linear_probe((x, y), (x * np.nan, y), (x, y), ProbeConfig())
    with pytest.raises(ValueError, match="two classes"):
        linear_probe((x, np.zeros(4)), (x, y), (x, y), ProbeConfig())


def test_text_finetune_learns_and_leaves_the_model_alone(world):
    root, tok = world
    model = OracleModel(tok)
    before = _snapshot(model)
    data = {s: load_text_cls(root, s) for s in ("train", "val", "test")}
    cfg = TextFinetuneConfig(epochs=15, batch_size=8, lr=1e-3, head_lr=5e-2, dropout=0.0)
    out = finetune_text(model, tok, data, cfg, device="cpu", max_length=16)
    assert out["accuracy"] >= 0.9 and out["num_classes"] == 2
    assert 1 <= out["best_epoch"] <= 15
    assert out["selected_on"] == "accuracy"  # no official metric asked for: the epoch is chosen on accuracy
    assert _unchanged(model, before)
    # Deterministic for a seed.
    again = finetune_text(model, tok, data, cfg, device="cpu", max_length=16)
    assert again == out


def test_finetune_neither_reads_nor_moves_the_global_rng(world):
    """With head dropout on, the result depends on the seed only, whatever torch's global RNG holds, and the
    global RNG is left where it was: a fine-tune in one thread cannot change another thread's random draws."""
    root, tok = world
    data = {s: load_text_cls(root, s) for s in ("train", "val", "test")}
    cfg = TextFinetuneConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=5e-2, dropout=0.3)
    model = OracleModel(tok)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(finetune_text(model, tok, data, cfg, device="cpu", max_length=16, seed=7))
        assert torch.equal(torch.get_rng_state(), state)
    assert runs[0] == runs[1]
    other = finetune_text(model, tok, data, cfg, device="cpu", max_length=16, seed=8)
    assert other["final_train_loss"] != runs[0]["final_train_loss"]  # the seed does drive head and dropout


def test_text_finetune_picks_the_epoch_by_its_selection_metric(world, monkeypatch):
    # A selection that scores (val, test) of epochs 1..3 as given: epoch 2 has the best val score, whatever the
    # accuracy says, and the result reports its scores under the selection's name.
    root, tok = world
    given = iter([0.1, 0.0, 0.9, 0.8, 0.2, 0.3])
    monkeypatch.setattr(finetune, "text_selection", lambda *args: Selection("mcc", lambda out, target: next(given)))
    data = {s: load_text_cls(root, s) for s in ("train", "val", "test")}
    out = finetune_text(OracleModel(tok), tok, data, TextFinetuneConfig(epochs=3, batch_size=8), device="cpu",
                        max_length=16, select_on="mcc")
    assert out["best_epoch"] == 2 and out["selected_on"] == "mcc"
    assert out["val_mcc"] == 0.9 and out["mcc"] == 0.8 and "accuracy" in out and "val_accuracy" in out


def test_text_regression_reports_pearson(world):
    _, tok = world
    model = OracleModel(tok)
    words = list(COLOURS)
    def ds(n, off):
        sentences = [f"a photo of a {words[(i + off) % len(words)]}." for i in range(n)]
        labels = [f"{((i + off) % len(words)) / 2 + 0.5:.1f}" for i in range(n)]
        return TextSet(sentences, labels)
    data = {"train": ds(36, 0), "val": ds(12, 1), "test": ds(12, 2)}
    assert text_task_kind(data["train"].labels, "auto") == "regression"
    cfg = TextFinetuneConfig(epochs=20, batch_size=6, lr=1e-3, head_lr=5e-2, dropout=0.0)
    out = finetune_text(model, tok, data, cfg, device="cpu", max_length=16, extra_metrics=("spearman",),
                        select_on="spearman")
    assert out["pearson"] > 0.8 and out["spearman"] > 0.8
    # STS-B style: the epoch is chosen on the val Spearman, reported beside the val Pearson r.
    assert out["selected_on"] == "spearman" and out["val_spearman"] > 0.8 and "val_pearson" in out
    with pytest.raises(ValueError, match=r"metrics \['mcc'\] do not apply to regression"):
        finetune_text(model, tok, data, cfg, device="cpu", max_length=16, extra_metrics=("mcc",))


def test_text_finetune_rejects_labels_outside_the_closed_set(world):
    root, tok = world
    data = {s: load_text_cls(root, s) for s in ("train", "val", "test")}
    with pytest.raises(ValueError, match="closed set"):
        finetune_text(OracleModel(tok), tok, data, TextFinetuneConfig(epochs=1), device="cpu", max_length=16,
                      classes=["0", "7"])
    with pytest.raises(ValueError, match="F1's positive label 'yes' is not among the classes"):
        finetune_text(OracleModel(tok), tok, data, TextFinetuneConfig(epochs=1), device="cpu", max_length=16,
                      extra_metrics=("f1",), positive="yes")


def test_multimodal_finetune_answers_colour_questions(world):
    root, tok = world
    model = OracleModel(tok)
    before = _snapshot(model)
    data = {s: load_vqa(root, s) for s in ("train", "val", "test")}
    cfg = FinetuneConfig(epochs=25, batch_size=8, lr=1e-3, head_lr=5e-2, dropout=0.0)
    out = finetune_multimodal(model, tok, data, cfg, transform=to_tensor, device="cpu", max_length=16)
    assert out["num_classes"] == len(COLOURS)
    assert out["accuracy"] >= 0.8  # chance is 1/6
    assert _unchanged(model, before)

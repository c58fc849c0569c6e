"""Zero-shot classification: template averaging, top-K accuracy, error handling, model left untouched."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flava.eval.features import tokenize
from flava.eval.zeroshot import (
    class_embeddings,
    confusion_matrix,
    evaluate_zeroshot,
    mean_reciprocal_rank,
    topk_accuracy,
    zeroshot_logits,
)
from tests.unit.test_eval_fakes import COLOURS, OracleModel, make_tokenizer, to_tensor, write_eval_root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    tok = make_tokenizer(root / "tok")
    return write_eval_root(root / "eval", per_class=3), tok


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    acc = topk_accuracy(logits, labels, (1, 2, 5))
    assert acc["top1"] == pytest.approx(2 / 4)
    assert acc["top2"] == pytest.approx(3 / 4)
    assert acc["top5"] == 1.0  # K beyond the number of classes saturates


def test_mean_reciprocal_rank_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])  # true class ranked 1, 2, 1, 3
    assert mean_reciprocal_rank(logits, labels) == pytest.approx((1 + 1 / 2 + 1 + 1 / 3) / 4)
    # it moves where top-1 cannot: the true class climbing from last to second leaves top-1 at 0
    worse = torch.tensor([[0.0, 0.1, 0.9]]), torch.tensor([0])
    better = torch.tensor([[0.5, 0.1, 0.9]]), torch.tensor([0])
    assert topk_accuracy(*worse, (1,)) == topk_accuracy(*better, (1,)) == {"top1": 0.0}
    assert mean_reciprocal_rank(*worse) == pytest.approx(1 / 3) and mean_reciprocal_rank(*better) == 0.5
    with pytest.raises(ValueError, match="empty"):
        mean_reciprocal_rank(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_class_embedding_is_renormalised_mean_of_normalised_templates(world):
    _, tok = world
    model = OracleModel(tok)
    templates = ["a photo of a {}.", "{}"]
    got = class_embeddings(model, tok, ["red", "blue"], templates, batch_size=3, device="cpu", max_length=16)
    assert got.shape == (2, 16)
    for i, name in enumerate(["red", "blue"]):
        ids, mask = tokenize(tok, [t.format(name) for t in templates], 16)
        each = F.normalize(model.encode_text(ids, mask), dim=-1)
        want = F.normalize(each.mean(0), dim=-1)
        assert torch.allclose(got[i], want.detach(), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_oracle_model_is_perfect_and_a_scrambled_one_is_not(world):
    root, tok = world
    model = OracleModel(tok).train()
    acc = evaluate_zeroshot(model, tok, root, "val", batch_size=5, device="cpu", transform=to_tensor)
    assert set(acc) == {"top1", "top5", "mrr"}
    assert acc["top1"] == 1.0 and acc["top5"] == 1.0 and acc["mrr"] == 1.0
    assert model.training  # the flag is restored

    scrambled = OracleModel(tok)
    with torch.no_grad():  # swap two colour words: their classes must now be confused
        a, b = tok.convert_tokens_to_ids(["red", "blue"])
        w = scrambled.token_embedding.weight
        w[[a, b]] = w[[b, a]]
    logits, labels, names = zeroshot_logits(scrambled, tok, root, "val", batch_size=5, device="cpu",
                                            transform=to_tensor)
    acc = topk_accuracy(logits, labels, (1,))
    assert acc["top1"] == pytest.approx(1 - 2 / len(COLOURS))
    cm = confusion_matrix(logits, labels, len(names))
    red, blue = names.index("red"), names.index("blue")
    assert cm[red, blue] == 3 and cm[blue, red] == 3 and cm.sum() == len(labels)


def test_evaluation_does_not_change_weights(world):
    root, tok = world
    model = OracleModel(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_zeroshot(model, tok, root, "test", batch_size=4, device="cpu", transform=to_tensor)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_eval_files_raise_named_errors(tmp_path, world):
    _, tok = world
    root = write_eval_root(tmp_path / "eval", per_class=1)
    model = OracleModel(tok)
    (root / "zeroshot" / "val.jsonl").write_text(json.dumps({"image": "images/nope.png", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="nope.png"):
        evaluate_zeroshot(model, tok, root, "val", batch_size=2, device="cpu", transform=to_tensor)
    (root / "zeroshot" / "val.jsonl").write_text(json.dumps({"image": "x.png", "label": 99}) + "\n")
    with pytest.raises(ValueError, match="label"):
        evaluate_zeroshot(model, tok, root, "val", batch_size=2, device="cpu", transform=to_tensor)
    (root / "zeroshot" / "classes.json").write_text(json.dumps({"classnames": ["a", "b"], "templates": ["x"]}))
    with pytest.raises(ValueError, match="placeholder"):
        evaluate_zeroshot(model, tok, root, "val", batch_size=2, device="cpu", transform=to_tensor)
    with pytest.raises(ValueError, match="split"):
        evaluate_zeroshot(model, tok, root, "dev", batch_size=2, device="cpu", transform=to_tensor)

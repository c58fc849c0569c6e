"""Zero-shot accuracy per attribute: known numbers on a hand-built prediction set, the readers' handling of
``attributes`` (optional, all rows or none), and the evaluation's metrics, plot and report when a set carries them."""
from __future__ import annotations

import json

import pytest

from flava.eval.attributes import attribute_accuracy, class_values
from flava.eval.config import EvalConfig
from flava.eval.datasets import load_zeroshot
from flava.eval.report import write_reports
from flava.eval.run import evaluate_model, write_plots
from tests.unit.test_eval_fakes import OracleModel, make_tokenizer, to_tensor, write_eval_root

CLASSES = ["red circle", "red square", "blue circle", "blue square"]
# (true label, predicted label, count, size, position): see the expected numbers in the test below.
ROWS = [
    (0, 0, 1, "small", "left"),   # right
    (0, 1, 2, "large", None),     # right colour, wrong shape
    (1, 3, 1, "large", "left"),   # wrong colour, right shape
    (2, 2, 2, "small", None),     # right
    (3, 1, 1, "small", "top"),    # wrong colour, right shape
    (3, 3, 2, "large", None),     # right
]


def _attributes(rows=ROWS):
    return [{"colour": CLASSES[label].split()[0], "shape": CLASSES[label].split()[1], "count": count, "size": size,
             "position": position} for label, _, count, size, position in rows]


def test_attribute_accuracy_by_hand():
    preds, labels = [r[1] for r in ROWS], [r[0] for r in ROWS]
    out = attribute_accuracy(preds, labels, CLASSES, _attributes())
    assert set(out) == {"colour", "shape", "count", "size", "position"}
    assert out["colour"]["accuracy"] == pytest.approx(4 / 6)
    assert out["colour"]["by_value"] == pytest.approx({"blue": 2 / 3, "red": 2 / 3})
    assert out["shape"]["accuracy"] == pytest.approx(5 / 6)
    assert out["shape"]["by_value"] == pytest.approx({"circle": 2 / 3, "square": 1.0})
    # A random class shares the true colour (shape) with probability 2/4.
    assert out["colour"]["chance"] == pytest.approx(0.5) and out["shape"]["chance"] == pytest.approx(0.5)
    # Image attributes: top-1 per value, integers in numeric order, null positions left out.
    assert list(out["count"]) == ["top1_by_value"]
    assert out["count"]["top1_by_value"] == pytest.approx({"1": 1 / 3, "2": 2 / 3})
    assert list(out["count"]["top1_by_value"]) == ["1", "2"]
    assert out["size"]["top1_by_value"] == pytest.approx({"large": 1 / 3, "small": 2 / 3})
    assert out["position"]["top1_by_value"] == pytest.approx({"left": 0.5, "top": 0.0})


def test_chance_follows_how_many_classes_share_a_value():
    classes = ["red circle", "red square", "red cross", "blue circle"]
    rows = [{"colour": c.split()[0], "shape": c.split()[1]} for c in classes]
    out = attribute_accuracy([0, 1, 2, 3], [0, 1, 2, 3], classes, rows)
    assert out["colour"]["accuracy"] == 1.0
    assert out["colour"]["chance"] == pytest.approx((3 / 4 * 3 + 1 / 4) / 4)
    assert out["shape"]["chance"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4 + 2 / 4) / 4)


def test_only_attributes_the_class_names_name_are_class_attributes():
    # One image per class: size is constant within each class here, yet it is an image attribute.
    rows = [(label, label, 1, "small" if label % 2 else "large", None) for label in range(4)]
    labels = [r[0] for r in rows]
    assert class_values("colour", CLASSES, labels, _attributes(rows)) == ["red", "red", "blue", "blue"]
    assert class_values("size", CLASSES, labels, _attributes(rows)) is None
    assert class_values("position", CLASSES, labels, _attributes(rows)) is None  # all null
    # A class name holding two values of the attribute is ambiguous: scored per image instead.
    assert class_values("colour", ["red blue", "blue circle"], [0, 1], [{"colour": "red"}, {"colour": "blue"}]) is None
    with pytest.raises(ValueError, match="one entry per image"):
        attribute_accuracy([0], [0, 1], CLASSES, _attributes(rows[:2]))


def _add_attributes(root, rows_for=lambda i, row: {"colour_index": row["label"], "count": 1 + i % 2}):
    for split in ("train", "val", "test"):
        path = root / "zeroshot" / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**row, "attributes": rows_for(i, row)}) + "\n"
                                for i, row in enumerate(rows)))


def test_reader_keeps_attributes_when_every_row_has_them(tmp_path):
    root = write_eval_root(tmp_path / "eval", per_class=2)
    assert load_zeroshot(root, "test").attributes is None  # real datasets: none, and extra keys do no harm
    _add_attributes(root)
    data = load_zeroshot(root, "test")
    assert data.attributes[:2] == [{"colour_index": 0, "count": 1}, {"colour_index": 0, "count": 2}]

    path = root / "zeroshot" / "val.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "attributes" or i == 0}) + "\n"
                            for i, r in enumerate(rows)))
    with pytest.raises(ValueError, match="val.jsonl: row 1 lacks 'attributes'"):
        load_zeroshot(root, "val")
    rows[0]["attributes"] = {"count": [1, 2]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="row 0: 'attributes' must be an object"):
        load_zeroshot(root, "val")


def test_evaluation_reports_attributes_with_a_plot(tmp_path):
    root = write_eval_root(tmp_path / "eval", per_class=4)
    classnames = json.loads((root / "zeroshot" / "classes.json").read_text())["classnames"]
    _add_attributes(root, lambda i, row: {"colour": classnames[row["label"]], "count": 1 + i % 2})
    tok = make_tokenizer(tmp_path / "tok")
    only_zs = EvalConfig.model_validate({
        "retrieval": {"enabled": False}, "probe": {"enabled": False},
        "text_finetune": {"enabled": False}, "multimodal_finetune": {"enabled": False},
    })
    metrics, extras = evaluate_model(OracleModel(tok), tok, root, only_zs, transform=to_tensor, device="cpu",
                                     max_length=16)
    attrs = metrics["zeroshot"]["attributes"]
    assert attrs["colour"]["accuracy"] == 1.0 and attrs["colour"]["chance"] == pytest.approx(1 / len(classnames))
    assert attrs["count"]["top1_by_value"] == {"1": 1.0, "2": 1.0}
    json.dumps(metrics)

    plots = write_plots(tmp_path / "out", metrics, extras, dpi=40)
    rel = plots["Zero-shot accuracy per attribute"]
    assert (tmp_path / "out" / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_reports(tmp_path / "out", metrics, {"model": "oracle"}, plots)
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"![Zero-shot accuracy per attribute]({rel})" in md
    assert "| colour | attribute accuracy | 1.0000 |" in md and "| count | top-1 |" in md

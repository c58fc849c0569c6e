"""The paper's benchmarks from local copies in their official layouts (eval.benchmarks): readers, skips, errors,
sentence pairs, the official scoring (VQA answer normalisation and accuracy, GLUE MCC / F1 / Spearman) and one
evaluation of the oracle model with benchmarks configured."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from flava.eval.benchmarks import held_out, run_benchmarks, split_off
from flava.eval.config import GLUE_TASK_NAMES, EvalConfig
from flava.eval.context import EvalContext
from flava.eval.datasets import TextSet, load_text_cls
from flava.eval.features import tokenize
from flava.eval.finetune import text_selection
from flava.eval.glue_metrics import (
    CLASSIFICATION_SELECTION,
    REGRESSION_SELECTION,
    average_ranks,
    f1_score,
    matthews_corrcoef,
    pearson,
    select_epoch,
    selection_score,
    spearman,
)
from flava.eval.official import (
    GLUE_TASKS,
    load_glue_task,
    load_imagenet_folder,
    load_karpathy,
    load_vqav2,
    read_glue_tsv,
    read_synset_names,
)
from flava.eval.report import write_reports
from flava.eval.run import evaluate_model
from flava.eval.vqa_answers import answer_scores, normalize_answer, vqa_accuracy
from tests.unit.test_eval_fakes import (
    COLOURS,
    OracleModel,
    make_tokenizer,
    to_tensor,
    write_eval_root,
)
from tests.unit.test_eval_run import FAST

NAMES = list(COLOURS)
SYNSETS = {f"n{i + 1:08d}": name for i, name in enumerate(NAMES)}  # n00000001 -> red, ...


def _image(path: Path, rgb, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 6, (8, 8, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_imagenet(root: Path, per_class: int = 3) -> Path:
    """``root/{train,val}/<synset>/*.JPEG`` and ``root/LOC_synset_mapping.txt`` over the colour world."""
    for split in ("train", "val"):
        for synset, name in SYNSETS.items():
            for i in range(per_class):
                _image(root / split / synset / f"{synset}_{i}.JPEG", COLOURS[name], seed=i)
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{s} {n}, {n} thing, Colourus {n}\n" for s, n in SYNSETS.items()))
    return root


def write_karpathy(root: Path, name: str = "coco") -> tuple[Path, Path]:
    """``dataset_<name>.json`` with one test image per colour (plus a train one) and its image folder."""
    images = root / "images"
    entries = []
    for i, colour in enumerate(NAMES + ["red"]):
        filename = f"COCO_val2014_{i:012d}.jpg"
        sub = "val2014" if name == "coco" else ""
        _image(images / sub / filename, COLOURS[colour], seed=i)
        captions = [f"a photo of a {colour}.", colour, f"this is {colour}.", f"nice {colour} square.",
                    f"the {colour} shape.", "a sixth caption left out."]
        entry = {"filename": filename, "split": "test" if i < len(NAMES) else "train", "imgid": i,
                 "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
        if name == "coco":
            entry["filepath"] = sub
        entries.append(entry)
    path = root / f"dataset_{name}.json"
    path.write_text(json.dumps({"images": entries, "dataset": name}))
    return path, images


WARM = {"red", "yellow", "purple"}


def write_glue(root: Path, rows: int = 36) -> Path:
    """SST-2 (single sentences), QNLI and MRPC (pairs whose label depends on the second sentence only) and CoLA (no
    header) in the GLUE download layout; the other tasks are absent."""
    def colour(i: int) -> str:
        return NAMES[i % len(NAMES)]

    for split, n in (("train", rows), ("dev", len(NAMES) * 2)):
        sst = ["sentence\tlabel"] + [f"a photo of a {colour(i)} \t{int(colour(i) in WARM)}" for i in range(n)]
        qnli = ["index\tquestion\tsentence\tlabel"] + [
            f"{i}\twhat is it?\tthe {colour(i)} shape.\t{'entailment' if colour(i) in WARM else 'not_entailment'}"
            for i in range(n)]
        cola = [f"gj04\t{int(colour(i) in WARM)}\t\tthe {colour(i)} shape." for i in range(n)]
        mrpc = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{int(colour(i) in WARM)}\t{i}\t{i + n}\tis it so?\ta photo of a {colour(i)}." for i in range(n)]
        for task, lines in (("SST-2", sst), ("QNLI", qnli), ("CoLA", cola), ("MRPC", mrpc)):
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_vqav2(root: Path, per_colour: int = 4) -> dict[str, str]:
    """train2014 and val2014 questions + annotations JSONs and COCO image folders; one val question's answer is
    outside the train answers."""
    keys = {}
    for subtype, n in (("train2014", per_colour), ("val2014", 2)):
        questions, annotations = [], []
        for c, colour in enumerate(NAMES):
            for i in range(n):
                image_id = 1000 * (c + 1) + i
                _image(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", COLOURS[colour], seed=i)
                qid = image_id * 10
                questions.append({"image_id": image_id, "question": "what colour is it?", "question_id": qid})
                humans = [colour] * 9 + [NAMES[(c + 1) % len(NAMES)]]  # one annotator names the next colour
                annotations.append({"question_id": qid, "image_id": image_id, "multiple_choice_answer": colour,
                                    "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(humans)]})
        if subtype == "val2014":
            annotations[0]["multiple_choice_answer"] = "magenta"
            annotations[0]["answers"] = [{"answer": "magenta"}] * 10
        q = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        a = root / f"v2_mscoco_{subtype}_annotations.json"
        q.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
        a.write_text(json.dumps({"data_subtype": subtype, "annotations": annotations}))
        split = subtype[: -len("2014")]
        keys.update({f"{split}_questions": str(q), f"{split}_annotations": str(a),
                     f"{split}_images": str(root / subtype)})
    return keys


# --- readers -------------------------------------------------------------------------------------------------


def test_synset_map_forms(tmp_path):
    txt = tmp_path / "LOC_synset_mapping.txt"
    txt.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert read_synset_names(txt) == {"n01440764": "tench", "n01443537": "goldfish"}
    plain = tmp_path / "names.json"
    plain.write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    assert read_synset_names(plain) == read_synset_names(keras) == read_synset_names(txt)
    txt.write_text("n01440764 tench, Tinca tinca\nn0144 goldfish\n")
    with pytest.raises(ValueError, match=r"LOC_synset_mapping.txt: 'n0144' is not a WordNet synset id"):
        read_synset_names(txt)
    txt.write_text("n01440764 tench\nn01443537\n")
    with pytest.raises(ValueError, match=r"LOC_synset_mapping.txt:2: expected '<synset> <class name>'"):
        read_synset_names(txt)


def test_imagenet_folder_reads_synset_folders_in_id_order(tmp_path):
    root = write_imagenet(tmp_path / "imagenet", per_class=2)
    synsets = read_synset_names(root / "LOC_synset_mapping.txt")
    ds = load_imagenet_folder(root / "val", synsets, ["a photo of a {}."], per_class=1)
    assert ds.classnames == NAMES and ds.templates == ["a photo of a {}."]
    assert ds.labels == list(range(len(NAMES))) and ds.images[0].endswith("n00000001/n00000001_0.JPEG")
    (root / "val" / "n09999999").mkdir()
    with pytest.raises(ValueError, match="class folder 'n09999999' is not in the synset map"):
        load_imagenet_folder(root / "val", synsets, ["{}"])


def test_karpathy_reader_takes_the_split_and_five_captions(tmp_path):
    path, images = write_karpathy(tmp_path, "coco")
    ds = load_karpathy(path, images, "test", 5)
    assert len(ds.images) == len(NAMES) and all(len(c) == 5 for c in ds.captions)
    assert ds.images[0] == str(images / "val2014" / "COCO_val2014_000000000000.jpg")
    assert "a sixth caption left out." not in ds.captions[0]
    flickr, flickr_images = write_karpathy(tmp_path / "f", "flickr30k")
    assert len(load_karpathy(flickr, flickr_images, "test").images) == len(NAMES)
    with pytest.raises(ValueError, match=r"images\[0\]: 6 captions, fewer than captions_per_image=7"):
        load_karpathy(path, images, "test", 7)
    data = json.loads(path.read_text())
    data["images"][2]["sentences"] = [{"tokens": []}]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"dataset_coco.json: images\[2\]: every sentence needs a non-empty 'raw'"):
        load_karpathy(path, images)


def test_glue_readers_single_pair_and_headerless(tmp_path):
    root = write_glue(tmp_path / "glue_data")
    train, dev = load_glue_task(root, "sst2")
    assert train.pairs is None and dev.labels[:2] == ["1", "0"]
    train, dev = load_glue_task(root, "qnli")
    assert train.sentences[0] == "what is it?" and train.pairs[0] == "the red shape."
    assert set(dev.labels) == {"entailment", "not_entailment"}
    _, cola = load_glue_task(root, "cola")
    assert cola.sentences[0] == "the red shape." and cola.labels[0] == "1" and cola.pairs is None
    mnli = tmp_path / "dev_matched.tsv"
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
    row = "0\t1\t1e\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tThe cat sat.\tA cat sat.\t" + "\t".join(
        ["entailment"] * 6)
    mnli.write_text(f"{header}\n{row}\n0\t1\tshort row\n")
    with pytest.raises(ValueError, match=r"dev_matched.tsv:3: 3 fields, expected at least 16"):
        read_glue_tsv(mnli, GLUE_TASKS["mnli"])
    mnli.write_text(f"{header}\n{row}\n")
    ds = read_glue_tsv(mnli, GLUE_TASKS["mnli"])
    assert (ds.sentences, ds.pairs, ds.labels) == (["The cat sat."], ["A cat sat."], ["entailment"])
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tHe said.\tShe said.\n")
    assert read_glue_tsv(mrpc, GLUE_TASKS["mrpc"]).pairs == ["She said."]
    assert tuple(GLUE_TASKS) == GLUE_TASK_NAMES


def test_sentence_pairs_are_tokenised_as_pairs(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    ids, mask = tokenize(tok, ["what is it?"], 16, pairs=["red"])
    assert tok.convert_ids_to_tokens(ids[0][mask[0].bool()]) == ["[CLS]", "what", "is", "it", "?", "[SEP]", "red",
                                                                  "[SEP]"]
    (tmp_path / "eval" / "text_cls").mkdir(parents=True)
    (tmp_path / "eval" / "text_cls" / "train.tsv").write_text("sentence1\tsentence2\tlabel\nwhat?\tred\t1\n")
    ds = load_text_cls(tmp_path / "eval", "train")
    assert (ds.sentences, ds.pairs, ds.labels) == (["what?"], ["red"], ["1"])


def test_vqav2_reader_and_vqa_accuracy(tmp_path):
    keys = write_vqav2(tmp_path)
    ds = load_vqav2(keys["val_questions"], keys["val_annotations"], keys["val_images"])
    assert len(ds.questions) == 2 * len(NAMES) and ds.answers[0] == "magenta"
    assert ds.answer_scores[1] == {"red": 1.0, "green": pytest.approx(0.3)}  # 9 of 10 and 1 of 10 annotators
    assert ds.images[1].endswith("COCO_val2014_000000001001.jpg")
    anns = Path(keys["val_annotations"])
    data = json.loads(anns.read_text())
    data["annotations"][1]["multiple_choice_answer"] = "The Two."
    data["annotations"][1]["answers"] = [{"answer": a} for a in ["two", "2", "Two", "a two", "dog", "cat"] * 2]
    anns.write_text(json.dumps(data))
    ds = load_vqav2(keys["val_questions"], anns, keys["val_images"])
    # 12 annotators: "2" from 8 of them scores 1; "dog" from 2: (2 * 1/3 + 10 * 2/3) / 12.
    assert ds.answers[1] == "2"
    assert ds.answer_scores[1] == {"2": 1.0, "dog": pytest.approx(22 / 36), "cat": pytest.approx(22 / 36)}
    data["annotations"] = data["annotations"][1:]
    anns.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"questions.json: questions\[0\]: question_id 10000 has no entry"):
        load_vqav2(keys["val_questions"], anns, keys["val_images"])


# --- official scoring -------------------------------------------------------------------------------------------

NORMALISED = {
    "Two": "2", "two dogs": "2 dogs", "none": "0", "a dog": "dog", "The Dog.": "dog", "an apple": "apple",
    "  Yes\n": "yes", "it's": "it's", "its": "its", "dont": "don't", "isnt": "isn't", "couldnt've": "couldn't've",
    "well": "well", "were": "were", "1,000": "1000", "1,000 dollars, maybe": "1000 dollars maybe",
    "yes, it is": "yes it is", "red,blue": "red blue", "black-and-white": "black and white", "t-shirt": "t shirt",
    "left/right": "left right", "(left)": "left", "2.5": "2.5", "3.": "3", "a.m.": "am", "what?": "what",
    "a": "",
}


@pytest.mark.parametrize("raw", NORMALISED)
def test_vqa_answer_normalisation_is_the_official_processing(raw):
    assert normalize_answer(raw) == NORMALISED[raw]
    assert normalize_answer(NORMALISED[raw]) == NORMALISED[raw]  # class names and scores keys are already processed


def _leave_one_out(humans: list[str], answer: str) -> float:
    """The official accuracy spelt out: each human left out in turn, min(1, matches among the rest / 3), averaged."""
    return float(np.mean([min(1.0, sum(h == answer for k, h in enumerate(humans) if k != i) / 3)
                          for i in range(len(humans))]))


def test_vqa_accuracy_averages_the_leave_one_out_subsets():
    assert [vqa_accuracy(m, 10) for m in range(6)] == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])
    assert vqa_accuracy(10, 10) == 1.0
    for n in (1, 3, 7, 10):
        for m in range(n + 1):
            humans = ["x"] * m + ["y"] * (n - m)
            assert vqa_accuracy(m, n) == pytest.approx(_leave_one_out(humans, "x"))
    humans = ["Two", "2", "2"] + ["a dog"] * 4 + ["dog", "dog"] + ["cat"]
    assert answer_scores(humans) == {"2": pytest.approx(0.9), "dog": 1.0, "cat": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="0 <= matches <= humans"):
        vqa_accuracy(11, 10)
    with pytest.raises(ValueError, match="at least one human answer"):
        answer_scores([])


def _from_confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[list[int], list[int]]:
    """(predictions, targets) with the given binary confusion counts."""
    pairs = [(1, 1)] * tp + [(0, 0)] * tn + [(1, 0)] * fp + [(0, 1)] * fn
    return [p for p, _ in pairs], [t for _, t in pairs]


def test_matthews_and_f1_from_hand_computed_confusions():
    pred, target = _from_confusion(tp=6, tn=3, fp=1, fn=2)
    # (6*3 - 1*2) / sqrt((6+1)(6+2)(3+1)(3+2))
    assert matthews_corrcoef(pred, target) == pytest.approx(16 / np.sqrt(7 * 8 * 4 * 5))
    assert f1_score(pred, target) == pytest.approx(2 * 6 / (2 * 6 + 1 + 2))
    assert f1_score(pred, target, positive=0) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert matthews_corrcoef(*_from_confusion(5, 5, 0, 0)) == 1.0
    assert matthews_corrcoef(*_from_confusion(0, 0, 5, 5)) == -1.0
    # Three classes: c = 4 correct of s = 6; predicted per class (2, 2, 2), true (3, 2, 1).
    # (4*6 - (2*3 + 2*2 + 2*1)) / sqrt((36 - 12) * (36 - 14))
    assert matthews_corrcoef([0, 0, 1, 1, 2, 2], [0, 0, 1, 0, 2, 1]) == pytest.approx(12 / np.sqrt(24 * 22))


def test_degenerate_confusions_score_zero_without_dividing_by_zero():
    with np.errstate(all="raise"):
        assert matthews_corrcoef(*_from_confusion(tp=7, tn=0, fp=3, fn=0)) == 0.0  # predicts one class only
        assert matthews_corrcoef(*_from_confusion(tp=4, tn=0, fp=0, fn=6)) == 0.0  # one true class only
        assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0  # all one class, all right
        assert matthews_corrcoef([0], [0]) == 0.0
        assert f1_score(*_from_confusion(tp=0, tn=9, fp=0, fn=0)) == 0.0  # no positive anywhere
        assert f1_score(*_from_confusion(tp=0, tn=2, fp=3, fn=4)) == 0.0
        assert spearman([1, 2, 3], [5, 5, 5]) == 0.0 and pearson([2, 2], [1, 3]) == 0.0
    with pytest.raises(ValueError, match="must be equal non-empty 1-D"):
        matthews_corrcoef([1, 0], [1])
    with pytest.raises(ValueError, match="must be equal non-empty 1-D"):
        f1_score([], [])


def test_spearman_ranks_with_ties():
    assert list(average_ranks([10, 20, 20, 30])) == [1.0, 2.5, 2.5, 4.0]
    assert list(average_ranks([3.0, 1.0, 2.0])) == [3.0, 1.0, 2.0]
    x, y = [1, 2, 3, 4], [1, 4, 9, 100]  # monotone, far from linear
    assert spearman(x, y) == pytest.approx(1.0) and pearson(x, y) < 0.9
    assert spearman(x, y[::-1]) == pytest.approx(-1.0)
    # Ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: deviations (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5).
    assert spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))


def test_glue_metrics_agree_with_scikit_learn_and_scipy():
    metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for k in (2, 3):
        pred, target = rng.integers(0, k, 200), rng.integers(0, k, 200)
        assert matthews_corrcoef(pred, target) == pytest.approx(metrics.matthews_corrcoef(target, pred))
    pred, target = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert f1_score(pred, target) == pytest.approx(metrics.f1_score(target, pred))
    x, y = rng.integers(0, 6, 100).astype(float), rng.normal(size=100)  # ties in x
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_epoch_selection_follows_the_official_metric_not_accuracy():
    # Imbalanced val split: 8 negatives, 2 positives. Epoch 1 predicts all negative: accuracy 0.8, MCC 0, F1 0.
    # Epoch 2 finds both positives with 3 false alarms: accuracy 0.7, MCC 10 / sqrt(5 * 2 * 8 * 5) = 0.5, F1 4/7.
    target = torch.tensor([0] * 8 + [1] * 2)
    preds = (torch.zeros(10, dtype=torch.long), torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1]))
    outputs = [torch.nn.functional.one_hot(p, 2).float() * 3 - 1 for p in preds]  # logits, argmax = prediction

    def scores(metric):
        selection = text_selection(metric, False, ["0", "1"], "1")
        assert selection.name == metric
        return [selection.score(out, target) for out in outputs]

    assert scores("accuracy") == pytest.approx([0.8, 0.7]) and select_epoch(scores("accuracy")) == 0
    assert scores("mcc") == pytest.approx([0.0, 0.5])
    assert scores("f1_accuracy_mean") == pytest.approx([0.4, (4 / 7 + 0.7) / 2])
    # The task table decides: CoLA on MCC, MRPC / QQP on GLUE's mean of F1 and accuracy, the others on accuracy.
    assert select_epoch(scores(GLUE_TASKS["cola"].select_on)) == 1
    assert select_epoch(scores(GLUE_TASKS["mrpc"].select_on)) == select_epoch(scores(GLUE_TASKS["qqp"].select_on)) == 1
    assert select_epoch(scores(GLUE_TASKS["sst2"].select_on)) == select_epoch(scores(GLUE_TASKS["mnli"].select_on)) == 0
    assert select_epoch([0.5, 0.7, 0.7]) == 1  # the first best epoch on ties


def test_every_glue_task_selects_on_a_metric_of_its_kind():
    assert set(GLUE_TASKS) == set(GLUE_TASK_NAMES)
    for name, task in GLUE_TASKS.items():
        assert task.select_on in (REGRESSION_SELECTION if task.regression else CLASSIFICATION_SELECTION), name
    assert {n: t.select_on for n, t in GLUE_TASKS.items() if t.select_on != "accuracy"} == {
        "cola": "mcc", "mrpc": "f1_accuracy_mean", "qqp": "f1_accuracy_mean", "stsb": "spearman"}
    # STS-B is regression: its selection scores predicted values by rank correlation.
    assert text_selection("spearman", True, None, "1").score(torch.tensor([[0.1], [0.3], [0.2]]),
                                                             torch.tensor([1.0, 5.0, 2.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="selection metric 'mcc' does not apply to regression"):
        text_selection("mcc", True, None, "1")
    with pytest.raises(ValueError, match="selection metric 'spearman' does not apply to classification"):
        text_selection("spearman", False, ["0", "1"], "1")
    with pytest.raises(ValueError, match="F1's positive label 'yes' is not among the classes"):
        text_selection("f1_accuracy_mean", False, ["0", "1"], "yes")
    with pytest.raises(ValueError, match="unknown selection metric 'f1'"):
        selection_score("f1", [0, 1], [0, 1])
    with pytest.raises(ValueError, match="no epoch"):
        select_epoch([])


def test_held_out_parts_are_spread_and_never_straddle_an_image():
    assert held_out(10, 0.2) == [0, 5] and held_out(2, 0.1) == [0]
    with pytest.raises(ValueError, match="cannot spare"):
        held_out(1, 0.5)
    ds = TextSet([f"s{i}" for i in range(8)], [str(i % 2) for i in range(8)])
    kept, held = split_off(ds, [i // 2 for i in range(8)], 0.25, whole_groups=True)  # 4 groups of 2 -> 1 group
    assert held.sentences == ["s0", "s1"] and len(kept.sentences) == 6
    kept, held = split_off(ds, ds.labels, 0.25, whole_groups=False)  # stratified: one row per label
    assert sorted(held.labels) == ["0", "1"]


# --- configuration, skips and errors -----------------------------------------------------------------------------


def test_config_checks_benchmark_sections():
    with pytest.raises(ValidationError, match="imagenet.synsets"):
        EvalConfig.model_validate({"benchmarks": {"imagenet": {"val": "/x"}}})
    with pytest.raises(ValidationError, match="glue.tasks"):
        EvalConfig.model_validate({"benchmarks": {"glue": {"root": "/x", "tasks": ["sst2", "squad"]}}})
    with pytest.raises(ValidationError, match="set together"):
        EvalConfig.model_validate({"benchmarks": {"vqav2": {"val_questions": "/q"}}})
    assert not EvalConfig().benchmarks.configured


def test_unconfigured_is_absent_and_a_missing_configured_path_names_its_key(tmp_path):
    root = write_eval_root(tmp_path / "eval", per_class=2)
    tok = make_tokenizer(tmp_path / "tok")
    only_zs = {"retrieval": {"enabled": False}, "probe": {"enabled": False},
               "text_finetune": {"enabled": False}, "multimodal_finetune": {"enabled": False}}
    model = OracleModel(tok)
    metrics, _ = evaluate_model(model, tok, root, EvalConfig.model_validate(only_zs), transform=to_tensor,
                                device="cpu", max_length=16)
    assert "benchmarks" not in metrics  # the default pipeline's outputs are unchanged
    missing = EvalConfig.model_validate({**only_zs, "benchmarks": {"coco": {
        "karpathy_json": str(tmp_path / "nope.json"), "image_root": str(tmp_path)}}})
    with pytest.raises(FileNotFoundError, match=r"eval.benchmarks.coco.karpathy_json: .*nope.json not found"):
        evaluate_model(model, tok, root, missing, transform=to_tensor, device="cpu", max_length=16)
    glue = write_glue(tmp_path / "glue_data")
    listed = EvalConfig.model_validate({**only_zs, "benchmarks": {"glue": {"root": str(glue), "tasks": ["rte"]}}})
    with pytest.raises(FileNotFoundError, match="glue.tasks lists 'rte' but .*RTE lacks train.tsv and dev.tsv"):
        run_benchmarks(EvalContext(model, tok, root, listed, to_tensor, torch.device("cpu"), 16, 0))


def test_vqav2_finetune_scores_vqa_accuracy(tmp_path):
    root = write_eval_root(tmp_path / "eval", per_class=2)
    tok = make_tokenizer(tmp_path / "tok")
    ecfg = EvalConfig.model_validate({**FAST, "benchmarks": {"vqav2": write_vqav2(tmp_path / "vqa"),
                                                             "select_fraction": 0.25}})
    out = run_benchmarks(EvalContext(OracleModel(tok), tok, root, ecfg, to_tensor, torch.device("cpu"), 16, 0))
    vqa = out["vqav2"]
    assert vqa["num_classes"] == len(NAMES)
    # Every val question but the 'magenta' one can score 1; that one scores 0 whatever the model says.
    assert vqa["vqa_accuracy"] == pytest.approx((2 * len(NAMES) - 1) / (2 * len(NAMES)))
    # Best constant answer: e.g. 'blue' scores 1 on its 2 questions and 0.3 (1 of 10 annotators) on the 2 green ones.
    assert vqa["chance"] == pytest.approx((2 + 2 * 0.3) / 12)
    assert out["imagenet_zeroshot"] == {"skipped": "eval.benchmarks.imagenet.val is not set"}


# --- one evaluation end to end -----------------------------------------------------------------------------------


def test_evaluate_model_with_official_layouts_then_report(tmp_path):
    root = write_eval_root(tmp_path / "eval", per_class=2)
    tok = make_tokenizer(tmp_path / "tok")
    imagenet = write_imagenet(tmp_path / "imagenet")
    coco, coco_images = write_karpathy(tmp_path / "coco", "coco")
    glue = write_glue(tmp_path / "glue_data")
    ecfg = EvalConfig.model_validate({**FAST, "benchmarks": {
        "imagenet": {"val": str(imagenet / "val"), "train": str(imagenet / "train"),
                     "synsets": str(imagenet / "LOC_synset_mapping.txt")},
        "coco": {"karpathy_json": str(coco), "image_root": str(coco_images)},
        "glue": {"root": str(glue)},
    }})
    metrics, extras = evaluate_model(OracleModel(tok), tok, root, ecfg, transform=to_tensor, device="cpu",
                                     max_length=16)
    bench = metrics["benchmarks"]
    assert bench["imagenet_zeroshot"]["top1"] == 1.0 and bench["imagenet_zeroshot"]["chance"] == 1 / len(NAMES)
    assert bench["imagenet_linear_probe"]["accuracy"] == 1.0
    assert bench["coco_retrieval"]["i2t_r1"] == 1.0 and bench["coco_retrieval"]["num_images"] == len(NAMES)
    assert bench["flickr30k_retrieval"] == {"skipped": "eval.benchmarks.flickr30k.karpathy_json is not set"}
    assert bench["vqav2"] == {"skipped": "eval.benchmarks.vqav2.val_questions is not set"}
    # The QNLI label is in the second sentence only: learning it shows the pair reaches the model.
    assert bench["glue_qnli"]["accuracy"] == 1.0 and bench["glue_sst2"]["accuracy"] == 1.0
    # The official metric besides accuracy where GLUE has one; accuracy-only tasks gain no key.
    assert bench["glue_cola"]["accuracy"] == bench["glue_cola"]["mcc"] == 1.0
    assert bench["glue_mrpc"]["accuracy"] == bench["glue_mrpc"]["f1"] == 1.0
    assert "mcc" not in bench["glue_sst2"] and "f1" not in bench["glue_qnli"]
    # The epoch is chosen on the task's official metric, named beside its validation score.
    assert bench["glue_cola"]["selected_on"] == "mcc" and "val_mcc" in bench["glue_cola"]
    assert bench["glue_mrpc"]["selected_on"] == "f1_accuracy_mean" and bench["glue_mrpc"]["f1_accuracy_mean"] == 1.0
    assert bench["glue_sst2"]["selected_on"] == bench["glue_qnli"]["selected_on"] == "accuracy"
    assert bench["glue_mnli"]["skipped"].startswith("no train.tsv or dev_matched.tsv in ")
    assert set(metrics["tasks"]) == {"zeroshot", "retrieval_i2t", "retrieval_t2i", "linear_probe", "text_cls",
                                     "vqa"}  # benchmarks stay out of the macros the promotion gate reads
    assert "benchmarks" in extras["timings_s"]
    json.dumps(metrics)
    (tmp_path / "out").mkdir()
    write_reports(tmp_path / "out", metrics, {"model": "oracle"}, {})
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Paper benchmarks" in md and "| imagenet_zeroshot | top1 1.0000, top5 1.0000" in md
    assert "| vqav2 | skipped: eval.benchmarks.vqav2.val_questions is not set |" in md
    assert "| glue_cola | accuracy 1.0000, val_accuracy" in md and ", mcc 1.0000, " in md
    assert ", selected_on mcc, " in md

"""Readers for the paper's benchmarks in their official layouts, into the in-memory sets of :mod:`flava.eval.datasets`.

- ImageNet-1k: ``<folder>/n01440764/*.JPEG`` synset folders and a synset -> class-name file -> :class:`ZeroShotSet`;
- COCO / Flickr30k Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``) -> :class:`RetrievalSet`;
- GLUE TSVs as distributed (``SST-2/dev.tsv``, ``MNLI/dev_matched.tsv``, headerless ``CoLA``) -> :class:`TextSet`;
- VQAv2 questions + annotations JSONs and a COCO image folder -> :class:`VqaSet` with answers normalised and scored
  as the official VQA evaluation does (:mod:`flava.eval.vqa_answers`).

Every malformed entry raises a ``ValueError`` naming the file, the line or index and the problem.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flava.data.sources import load_class_names
from flava.eval.datasets import RetrievalSet, TextSet, VqaSet, ZeroShotSet
from flava.eval.glue_metrics import SelectionMetric
from flava.eval.vqa_answers import answer_scores, normalize_answer

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_SYNSET = re.compile(r"^n\d{8}$")
KARPATHY_SPLITS = ("train", "val", "test", "restval")


def read_synset_names(path: str | Path) -> dict[str, str]:
    """Synset -> class name from a class-name map in any form ingest reads (``LOC_synset_mapping.txt`` lines
    ``n01440764 tench, Tinca tinca``, JSON ``{synset: name}``, Keras' ``{"0": [synset, name]}``), keeping the
    first of WordNet's comma-separated synonyms (``tench``) as the prompt's class name."""
    names = {}
    for synset, label in load_class_names(Path(path)).items():
        if not _SYNSET.match(synset):
            raise ValueError(f"class-name map {path}: {synset!r} is not a WordNet synset id like 'n01440764'")
        name = label.split(",")[0].strip()
        if not name:
            raise ValueError(f"class-name map {path}: synset {synset} has an empty class name")
        names[synset] = name
    if len(names) < 2:
        raise ValueError(f"class-name map {path}: needs at least two synsets, found {len(names)}")
    return names


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_imagenet_folder(
    folder: str | Path, synsets: dict[str, str], templates: list[str], per_class: int | None = None
) -> ZeroShotSet:
    """A split in synset-folder layout -> :class:`ZeroShotSet` over every synset of the map (sorted by id, the
    usual label order); ``per_class`` keeps the first N images of each folder in name order."""
    folder = Path(folder)
    order = sorted(synsets)
    label_of = {s: i for i, s in enumerate(order)}
    images: list[str] = []
    labels: list[int] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in label_of:
            raise ValueError(f"{folder}: class folder {sub.name!r} is not in the synset map")
        files = _images_in(sub)[:per_class]
        images += [str(f) for f in files]
        labels += [label_of[sub.name]] * len(files)
    if not images:
        raise ValueError(f"{folder}: no images in synset folders (expected {folder}/n01440764/*.JPEG)")
    return ZeroShotSet([synsets[s] for s in order], list(templates), images, labels)


def load_karpathy(
    path: str | Path, image_root: str | Path, split: str = "test", captions_per_image: int = 5
) -> RetrievalSet:
    """One split of a Karpathy JSON (``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}``):
    the first ``captions_per_image`` raw captions of each image; images at ``image_root/[filepath/]filename``."""
    path, image_root = Path(path), Path(image_root)
    data = json.loads(path.read_text())
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list")
    images: list[str] = []
    captions: list[list[str]] = []
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or entry.get("split") not in KARPATHY_SPLITS:
            raise ValueError(f"{where}: 'split' must be one of {KARPATHY_SPLITS}")
        if entry["split"] != split:
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
            raise ValueError(f"{where}: 'filename' (and 'filepath' if present) must be strings")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise ValueError(f"{where}: 'sentences' must be a list of {{'raw': caption}}")
        raws = [s.get("raw") if isinstance(s, dict) else None for s in sentences]
        if not all(isinstance(r, str) and r.strip() for r in raws):
            raise ValueError(f"{where}: every sentence needs a non-empty 'raw' caption")
        if len(raws) < captions_per_image:
            raise ValueError(f"{where}: {len(raws)} captions, fewer than captions_per_image={captions_per_image}")
        image = image_root / filepath / filename
        if not image.is_file():
            raise ValueError(f"{where}: image {image} not found")
        images.append(str(image))
        captions.append([r.strip() for r in raws[:captions_per_image]])
    if not images:
        raise ValueError(f"{path}: no image in split {split!r}")
    return RetrievalSet(images, captions)


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's columns are in its TSVs (names for files with a header, indices for CoLA's), the
    official metrics reported besides accuracy (STS-B: besides Pearson r), as :mod:`flava.eval.finetune` names them,
    and ``select_on``, the validation metric the fine-tune picks its epoch on.

    ``select_on`` is the score the GLUE leaderboard ranks the task by: its macro-average counts a task reporting two
    metrics as their unweighted mean (Wang et al. 2019, Sec. 4), so MRPC and QQP select on ``f1_accuracy_mean``
    rather than F1 alone. STS-B selects on Spearman, the rank correlation, by choice: GLUE's own task score would be
    the mean of Pearson and Spearman. MNLI is scored and selected on accuracy, on matched dev."""

    folder: str
    dev: str
    text: str | int
    pair: str | int | None
    label: str | int
    regression: bool = False
    metrics: tuple[str, ...] = ()
    select_on: SelectionMetric = "accuracy"

    @property
    def header(self) -> bool:
        return isinstance(self.label, str)


GLUE_TASKS = {
    # CoLA has no header: source, label, original label, sentence.
    "cola": GlueTask("CoLA", "dev.tsv", 3, None, 1, metrics=("mcc",), select_on="mcc"),
    "sst2": GlueTask("SST-2", "dev.tsv", "sentence", None, "label"),
    "mrpc": GlueTask("MRPC", "dev.tsv", "#1 String", "#2 String", "Quality", metrics=("f1",),
                     select_on="f1_accuracy_mean"),
    "qqp": GlueTask("QQP", "dev.tsv", "question1", "question2", "is_duplicate", metrics=("f1",),
                    select_on="f1_accuracy_mean"),
    "stsb": GlueTask("STS-B", "dev.tsv", "sentence1", "sentence2", "score", regression=True, metrics=("spearman",),
                     select_on="spearman"),
    "mnli": GlueTask("MNLI", "dev_matched.tsv", "sentence1", "sentence2", "gold_label"),
    "qnli": GlueTask("QNLI", "dev.tsv", "question", "sentence", "label"),
    "rte": GlueTask("RTE", "dev.tsv", "sentence1", "sentence2", "label"),
}


def read_glue_tsv(path: str | Path, task: GlueTask) -> TextSet:
    """One GLUE TSV -> :class:`TextSet` (labels as written: ``entailment``, ``0``, ``3.800``...)."""
    path = Path(path)
    # utf-8-sig: MRPC's files start with a byte-order mark before 'Quality'.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = [task.text, task.label] + ([task.pair] if task.pair is not None else [])
        first = 1
        if task.header:
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path}:1: header lacks column(s) {missing}; got {header}")
            text_at, label_at = header.index(task.text), header.index(task.label)
            pair_at = header.index(task.pair) if task.pair is not None else None
            first = 2
        else:
            text_at, label_at, pair_at = task.text, task.label, task.pair
        needed = max(i for i in (text_at, label_at, pair_at) if i is not None) + 1
        sentences, pairs, labels = [], [], []
        for lineno, fields in enumerate(reader, first):
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) < needed:
                raise ValueError(f"{path}:{lineno}: {len(fields)} fields, expected at least {needed}")
            label = fields[label_at].strip()
            if not label:
                raise ValueError(f"{path}:{lineno}: empty label")
            sentences.append(fields[text_at])
            if pair_at is not None:
                pairs.append(fields[pair_at])
            labels.append(label)
    if not labels:
        raise ValueError(f"{path} holds no rows")
    return TextSet(sentences, labels, pairs if task.pair is not None else None)


def load_glue_task(root: str | Path, name: str) -> tuple[TextSet, TextSet]:
    """(train, dev) of one task under a GLUE root (``glue_data/`` as the download script leaves it)."""
    task = GLUE_TASKS[name]
    folder = Path(root) / task.folder
    return read_glue_tsv(folder / "train.tsv", task), read_glue_tsv(folder / task.dev, task)


def _coco_image_index(folder: Path) -> dict[int, str]:
    """COCO image id -> path, from names ending in the zero-padded id (``COCO_val2014_000000000042.jpg``)."""
    out = {}
    for path in folder.iterdir():
        match = re.search(r"(\d+)$", path.stem)
        if match and path.suffix.lower() in IMAGE_SUFFIXES:
            out[int(match.group(1))] = str(path)
    return out


def load_vqav2(questions: str | Path, annotations: str | Path, images: str | Path) -> VqaSet:
    """The official questions + annotations JSONs -> :class:`VqaSet`: ``answers`` the normalised
    ``multiple_choice_answer`` (the training target), ``answer_scores`` the official VQA accuracy of every normalised
    answer the annotators gave (so a predicted answer class is scored as the official evaluation scores it)."""
    questions, annotations = Path(questions), Path(annotations)
    qs = json.loads(questions.read_text()).get("questions")
    anns = json.loads(annotations.read_text()).get("annotations")
    if not isinstance(qs, list) or not qs:
        raise ValueError(f"{questions}: expected a JSON object with a non-empty 'questions' list")
    if not isinstance(anns, list):
        raise ValueError(f"{annotations}: expected a JSON object with an 'annotations' list")
    by_id: dict[int, dict[str, Any]] = {}
    for i, ann in enumerate(anns):
        where = f"{annotations}: annotations[{i}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("question_id"), int):
            raise ValueError(f"{where}: needs an integer 'question_id'")
        given = ann.get("answers")
        if not isinstance(given, list) or not given or not all(
            isinstance(a, dict) and isinstance(a.get("answer"), str) for a in given
        ):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of {{'answer': str}}")
        best = ann.get("multiple_choice_answer")
        if not isinstance(best, str) or not best.strip():
            raise ValueError(f"{where}: 'multiple_choice_answer' must be a non-empty string")
        by_id[ann["question_id"]] = ann
    index = _coco_image_index(Path(images))
    paths, texts, answers, scores = [], [], [], []
    for i, q in enumerate(qs):
        where = f"{questions}: questions[{i}]"
        if not isinstance(q, dict) or not isinstance(q.get("question_id"), int) or not isinstance(
            q.get("image_id"), int
        ):
            raise ValueError(f"{where}: needs integer 'question_id' and 'image_id'")
        text = q.get("question")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        ann = by_id.get(q["question_id"])
        if ann is None:
            raise ValueError(f"{where}: question_id {q['question_id']} has no entry in {annotations}")
        if q["image_id"] not in index:
            raise ValueError(f"{where}: no image for image_id {q['image_id']} in {images}")
        paths.append(index[q["image_id"]])
        texts.append(text)
        answers.append(normalize_answer(ann["multiple_choice_answer"]))
        scores.append(answer_scores([a["answer"] for a in ann["answers"]]))
    return VqaSet(paths, texts, answers, scores)

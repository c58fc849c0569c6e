"""Readers for the evaluation sets (layout in docs/interfaces.md, "Evaluation sets").

Real datasets enter through the same formats as the synthetic ones: class folders become zero-shot rows
``{"image", "label"}``, retrieval manifests ``{"image", "captions": [...]}``, GLUE-style TSV ``sentence\\tlabel``
and VQA-style JSONL ``{"image", "question", "answer"}``. Every malformed row raises a ``ValueError`` naming the
file, line and problem. Relative image paths resolve against the manifest's folder, then the eval root, then the
working directory.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from flava.data import jsonl
from flava.data.storage import is_s3, read_bytes
from flava.data.transforms import decode_image

SPLITS = ("train", "val", "test")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an evaluation set; a missing or empty file is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"evaluation file {path} not found")
    rows = jsonl.read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def resolve_image(value: Any, manifest: Path, eval_root: Path, where: str) -> str:
    """A row's ``image`` field -> an existing local path (string)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: 'image' must be a non-empty string path")
    if is_s3(value):
        return value  # fetched when read; a missing object fails then with its URI
    candidate = Path(value)
    if candidate.is_absolute():
        options = [candidate]
    else:
        options = [manifest.parent / candidate, eval_root / candidate, candidate]
    for option in options:
        if option.is_file():
            return str(option)
    raise ValueError(f"{where}: image {value!r} not found (tried {', '.join(str(o) for o in options)})")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclass(frozen=True)
class ZeroShotSet:
    classnames: list[str]
    templates: list[str]
    images: list[str]
    labels: list[int]
    # Per row, the scene's attributes by name (``{"colour": "red", "count": 2, ...}``) when every row carries an
    # ``attributes`` object (the synthetic world does); None for sets without them (real datasets).
    attributes: list[dict[str, Any]] | None = None


_ATTRIBUTE_TYPES = (str, int, type(None))  # what an attribute value may be


def _row_attributes(row: dict[str, Any], where: str) -> dict[str, Any] | None:
    """A row's optional ``attributes``: an object of scalar values (strings, integers or null)."""
    value = row.get("attributes")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, _ATTRIBUTE_TYPES)
                                              and not isinstance(v, bool) for k, v in value.items()):
        raise ValueError(f"{where}: 'attributes' must be an object of string, integer or null values, got {value!r}")
    return value


def load_classes(eval_root: str | Path) -> tuple[list[str], list[str]]:
    path = Path(eval_root) / "zeroshot" / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"zero-shot classes file {path} not found")
    spec = json.loads(path.read_text())
    classnames, templates = spec.get("classnames"), spec.get("templates")
    if not isinstance(classnames, list) or len(classnames) < 2 or not all(isinstance(c, str) for c in classnames):
        raise ValueError(f"{path}: 'classnames' must be a list of at least two strings")
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"{path}: 'classnames' has duplicates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"{path}: 'templates' must be a non-empty list of strings")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: templates {bad} lack the '{{}}' placeholder for the class name")
    return classnames, templates


def load_zeroshot(eval_root: str | Path, split: str) -> ZeroShotSet:
    """Class names, prompt templates and ``(image, label)`` rows of one split (train/val also feed the probe)."""
    _check_split(split)
    root = Path(eval_root)
    classnames, templates = load_classes(root)
    manifest = root / "zeroshot" / f"{split}.jsonl"
    images, labels, attributes = [], [], []
    for i, row in enumerate(read_jsonl(manifest)):
        where = f"{manifest}: row {i}"
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(classnames):
            raise ValueError(f"{where}: 'label' must be a class index in [0, {len(classnames)}), got {label!r}")
        images.append(resolve_image(row.get("image"), manifest, root, where))
        labels.append(label)
        attributes.append(_row_attributes(row, where))
    carried = [a is not None for a in attributes]
    if any(carried) and not all(carried):
        raise ValueError(f"{manifest}: row {carried.index(not carried[0])} "
                         f"{'lacks' if carried[0] else 'has'} 'attributes' while row 0 "
                         f"{'has' if carried[0] else 'lacks'} them: give every row attributes or none")
    return ZeroShotSet(classnames, templates, images, labels, attributes if all(carried) else None)


@dataclass(frozen=True)
class RetrievalSet:
    images: list[str]
    captions: list[list[str]]


def load_retrieval(eval_root: str | Path, split: str = "test") -> RetrievalSet:
    _check_split(split)
    root = Path(eval_root)
    manifest = root / "retrieval" / f"{split}.jsonl"
    images, captions = [], []
    for i, row in enumerate(read_jsonl(manifest)):
        where = f"{manifest}: row {i}"
        caps = row.get("captions")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"{where}: 'captions' must be a non-empty list of non-empty strings")
        images.append(resolve_image(row.get("image"), manifest, root, where))
        captions.append(caps)
    return RetrievalSet(images, captions)


@dataclass(frozen=True)
class TextSet:
    sentences: list[str]
    labels: list[str]  # raw label strings; the fine-tuner decides classes vs regression targets
    pairs: list[str] | None = None  # second sentences of sentence-pair tasks (tokenised as a pair), else None


_TEXT_HEADERS = (["sentence", "label"], ["sentence1", "sentence2", "label"])


def load_text_cls(eval_root: str | Path, split: str) -> TextSet:
    """GLUE-style TSV with header ``sentence<TAB>label``, or ``sentence1<TAB>sentence2<TAB>label`` for pairs."""
    _check_split(split)
    path = Path(eval_root) / "text_cls" / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"text classification file {path} not found")
    with path.open(newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        columns = next((h for h in _TEXT_HEADERS if header and [f.strip() for f in header[: len(h)]] == h), None)
        if columns is None:
            raise ValueError(f"{path}: header must start with 'sentence\\tlabel' or 'sentence1\\tsentence2\\tlabel', "
                             f"got {header!r}")
        width = len(columns)
        texts: list[list[str]] = [[] for _ in range(width - 1)]
        labels = []
        for lineno, fields in enumerate(reader, 2):
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) < width or not all(f.strip() for f in fields[:width]):
                raise ValueError(f"{path}:{lineno}: expected {' and '.join(columns)} separated by tabs")
            for column, value in zip(texts, fields):
                column.append(value)
            labels.append(fields[width - 1].strip())
    if not labels:
        raise ValueError(f"{path} holds no rows")
    return TextSet(texts[0], labels, texts[1] if width == 3 else None)


@dataclass(frozen=True)
class VqaSet:
    images: list[str]
    questions: list[str]
    answers: list[str]
    # Open-ended sets (VQAv2): per question {answer: VQA accuracy of giving it}; the fine-tuner then scores with
    # these and lets test answers fall outside the answer classes. None: exact match with ``answers``.
    answer_scores: list[dict[str, float]] | None = None


def load_vqa(eval_root: str | Path, split: str) -> VqaSet:
    _check_split(split)
    root = Path(eval_root)
    manifest = root / "vqa" / f"{split}.jsonl"
    images, questions, answers = [], [], []
    for i, row in enumerate(read_jsonl(manifest)):
        where = f"{manifest}: row {i}"
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(answer, (str, int)) or isinstance(answer, bool) or not str(answer).strip():
            raise ValueError(f"{where}: 'answer' must be a non-empty string")
        images.append(resolve_image(row.get("image"), manifest, root, where))
        questions.append(question)
        answers.append(str(answer))
    return VqaSet(images, questions, answers)


class ImageDataset(torch.utils.data.Dataset):
    """Image paths or ``s3://`` URIs -> transformed tensors (EXIF-oriented RGB, as the training loaders decode)."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = decode_image(read_bytes(path))
        except ValueError as err:
            raise ValueError(f"evaluation image {path}: {err}") from err
        return self.transform(image)


def load_closed_set(eval_root: str | Path, task: str) -> list[str] | None:
    """The closed label/answer set a task declares beside its splits (``text_cls/labels.json`` ``{"labels"}``,
    ``vqa/answers.json`` ``{"answers"}``), or None when the file is absent (then the train split defines it)."""
    names = {"text_cls": ("labels.json", "labels"), "vqa": ("answers.json", "answers")}
    if task not in names:
        raise ValueError(f"no closed set for task {task!r}; known: {sorted(names)}")
    filename, key = names[task]
    path = Path(eval_root) / task / filename
    if not path.exists():
        return None
    values = json.loads(path.read_text()).get(key)
    if not isinstance(values, list) or len(values) < 2 or len(set(map(str, values))) != len(values):
        raise ValueError(f"{path}: {key!r} must be a list of at least two distinct values")
    return [str(v) for v in values]

"""Fine-tuning evaluations: a head on the text CLS (GLUE style) and on the multimodal CLS (VQA style).

Each run deep-copies the evaluated model (the original is never touched), puts a dropout + linear head on the
chosen CLS feature, trains both with AdamW (encoder at ``lr``, head at ``head_lr``) for ``epochs`` epochs, and
reports the test metric at the epoch with the best validation metric (checkpoint selection on val, as GLUE
protocols do). Classification reports accuracy; regression (GLUE STS-B style, numeric labels) reports Pearson r.
Text fine-tunes may also report official GLUE metrics of the test split at that epoch (``mcc``, ``f1``,
``spearman``: :mod:`flava.eval.glue_metrics`) and choose the epoch on a GLUE task's official metric
(``select_on``); otherwise the epoch is chosen on accuracy / Pearson r / VQA accuracy. Every result names its
selection metric (``selected_on``) and holds its validation score at the chosen epoch (``val_<metric>``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flava.eval.config import FinetuneConfig, TextFinetuneConfig
from flava.eval.datasets import ImageDataset, TextSet, VqaSet
from flava.eval.features import text_length, tokenize
from flava.eval.glue_metrics import (
    CLASSIFICATION_SELECTION,
    REGRESSION_SELECTION,
    SelectionMetric,
    f1_score,
    matthews_corrcoef,
    pearson,
    select_epoch,
    selection_score,
    spearman,
)


class Head(torch.nn.Module):
    """Dropout + linear on a CLS feature. Its initial weights (``nn.Linear``'s default range) and its dropout
    masks come from ``generator``, the run's own: never from torch's global RNG, which every thread of the process
    shares (the Prefect flow runs stages in threads)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, generator: torch.Generator):
        super().__init__()
        self.p = dropout
        self.generator = generator
        self.linear = torch.nn.utils.skip_init(torch.nn.Linear, in_dim, out_dim)  # no draw from the global RNG
        bound = in_dim**-0.5
        with torch.no_grad():
            for param in (self.linear.weight, self.linear.bias):
                param.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0:
            keep = torch.rand(x.shape, generator=self.generator) >= self.p  # drawn on the CPU generator
            x = x * keep.to(x.device, x.dtype) / (1 - self.p)
        return self.linear(x)


@dataclass
class _Split:
    """Inputs of one split: tokenised text (+ image paths for multimodal) and targets."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    images: list[str] | None = None
    # Open-ended VQA: per question {answer class: VQA accuracy}; the metric is then the mean score of the predicted
    # class (an answer outside the classes scores 0) instead of exact-match accuracy.
    soft: list[dict[int, float]] | None = None

    def __len__(self) -> int:
        return self.targets.shape[0]


# Official GLUE metrics a text fine-tune can add, by task kind.
CLASSIFICATION_EXTRAS = ("mcc", "f1")
REGRESSION_EXTRAS = ("spearman",)
ExtraScores = Callable[[torch.Tensor, _Split], dict[str, float]]


@dataclass(frozen=True)
class Selection:
    """The validation metric that picks the epoch: its reported name and its score of a split's (outputs, targets)."""

    name: str
    score: Callable[[torch.Tensor, torch.Tensor], float]


def _metric(outputs: torch.Tensor, split: _Split, regression: bool) -> float:
    if regression:
        return pearson(outputs.squeeze(-1).double().numpy(), split.targets.double().numpy())
    pred = outputs.argmax(dim=-1)
    if split.soft is not None:
        return sum(scores.get(p, 0.0) for scores, p in zip(split.soft, pred.tolist())) / len(split)
    return float((pred == split.targets).float().mean())


def _run(
    model: torch.nn.Module,
    features: Callable[[torch.nn.Module, _Split, torch.Tensor, torch.device], torch.Tensor],
    feature_dim: int,
    splits: dict[str, _Split],
    out_dim: int,
    regression: bool,
    fcfg: FinetuneConfig,
    device: torch.device,
    seed: int,
    extra: ExtraScores | None = None,
    select: Selection | None = None,
) -> dict[str, float | str]:
    """Fine-tune and report the best-val epoch; ``extra`` adds scores of that epoch's test outputs. ``select``
    chooses the epoch (default: the task's own metric, accuracy / Pearson r / VQA accuracy) and adds its val and
    test scores under its name where the task's metric does not already report them."""
    encoder = copy.deepcopy(model).to(device)
    gen = torch.Generator().manual_seed(seed)
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in encoder.modules()):
        # the model's own dropout (0 in every preset) has no generator argument in torch: it draws from the
        # global RNG, seeded here as the training stages seed it (flava.train.stages.seed_dropout)
        torch.manual_seed(seed)
    head = Head(feature_dim, out_dim, fcfg.dropout, gen).to(device)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": fcfg.lr}, {"params": head.parameters(), "lr": fcfg.head_lr}],
        weight_decay=fcfg.weight_decay,
    )
    train = splits["train"]

    def predict(split: _Split) -> torch.Tensor:
        encoder.eval()
        head.eval()
        outs = []
        with torch.no_grad():
            for start in range(0, len(split), fcfg.batch_size):
                idx = torch.arange(start, min(start + fcfg.batch_size, len(split)))
                outs.append(head(features(encoder, split, idx, device)).float().cpu())
        return torch.cat(outs)

    history = []
    for epoch in range(fcfg.epochs):
        encoder.train()
        head.train()
        order = torch.randperm(len(train), generator=gen)
        total, steps = 0.0, 0
        for start in range(0, len(train), fcfg.batch_size):
            idx = order[start : start + fcfg.batch_size]
            out = head(features(encoder, train, idx, device))
            target = train.targets[idx].to(device)
            loss = F.mse_loss(out.squeeze(-1), target) if regression else F.cross_entropy(out, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        val_out = predict(splits["val"])
        val = _metric(val_out, splits["val"], regression)
        test_out = predict(splits["test"])
        test = _metric(test_out, splits["test"], regression)
        history.append({
            "epoch": epoch + 1, "train_loss": total / max(steps, 1), "val": val, "test": test,
            "extra": extra(test_out, splits["test"]) if extra is not None else {},
            "select": (select.score(val_out, splits["val"].targets), select.score(test_out, splits["test"].targets))
            if select is not None else (val, test),
        })
    best = history[select_epoch([h["select"][0] for h in history])]
    name = "pearson" if regression else "vqa_accuracy" if splits["test"].soft is not None else "accuracy"
    selected = select.name if select is not None else name
    return {
        name: best["test"],
        f"val_{name}": best["val"],
        "best_epoch": float(best["epoch"]),
        "final_train_loss": history[-1]["train_loss"],
        **best["extra"],
        selected: best["select"][1],
        f"val_{selected}": best["select"][0],
        "selected_on": selected,
    }


def _feature_dim(model: torch.nn.Module, fn: Callable[[], torch.Tensor]) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        dim = fn().shape[-1]
    model.train(was)
    return int(dim)


def _class_targets(
    labels: Sequence[str], classes: list[str], where: str, unknown: int | None = None
) -> torch.Tensor:
    """Label strings -> class indices. Labels may be the class names or (GLUE style) integer indices into the
    declared closed set, e.g. TSV labels ``0..3`` with ``labels.json`` naming the four classes. With ``unknown``
    set, a label outside the classes maps to it (open-ended VQA test questions) instead of raising."""
    index = {c: i for i, c in enumerate(classes)}
    if unknown is not None:
        return torch.tensor([index.get(label, unknown) for label in labels], dtype=torch.long)
    if not set(labels) & set(index) and all(v.isdigit() for v in labels):
        out_of_range = sorted({int(v) for v in labels if int(v) >= len(classes)})
        if out_of_range:
            raise ValueError(f"{where}: label indices {out_of_range[:5]} outside the closed set of {len(classes)}")
        return torch.tensor([int(v) for v in labels], dtype=torch.long)
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"{where}: labels {unknown[:5]} are not in the closed set {classes[:10]}")
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


def text_task_kind(labels: Sequence[str], requested: str) -> str:
    """``auto``: regression when every label is a number and some is not an integer, else classification."""
    if requested != "auto":
        return requested
    try:
        values = [float(v) for v in labels]
    except ValueError:
        return "classification"
    return "regression" if any(not v.is_integer() for v in values) else "classification"


def finetune_text(
    model: torch.nn.Module,
    tokenizer,
    data: dict[str, TextSet],
    fcfg: TextFinetuneConfig,
    *,
    device: torch.device | str,
    max_length: int,
    classes: list[str] | None = None,
    seed: int = 0,
    extra_metrics: Sequence[str] = (),
    positive: str = "1",
    select_on: SelectionMetric | None = None,
) -> dict[str, float | str]:
    """Head on ``model.text_features`` (text CLS) over ``data["train"|"val"|"test"]``. ``extra_metrics`` names
    official GLUE metrics of the test split to report too (classification: ``mcc``, ``f1`` of the ``positive``
    label; regression: ``spearman``). ``select_on`` is the validation metric that picks the epoch (a GLUE task's
    ``GlueTask.select_on``); None: accuracy, or Pearson r for regression."""
    device = torch.device(device)
    max_length = text_length(model, max_length)
    kind = text_task_kind(data["train"].labels, fcfg.task)
    regression = kind == "regression"
    if not regression:
        classes = classes or sorted(set(data["train"].labels))
        if len(classes) < 2:
            raise ValueError("text fine-tuning needs at least two classes in the train split")
    extra = _extra_scores(extra_metrics, regression, classes, positive)
    select = text_selection(select_on, regression, classes, positive) if select_on is not None else None
    splits = {}
    for name, ds in data.items():
        ids, mask = tokenize(tokenizer, ds.sentences, max_length, pairs=ds.pairs)
        if regression:
            try:
                targets = torch.tensor([float(v) for v in ds.labels], dtype=torch.float32)
            except ValueError as err:
                raise ValueError(f"text_cls {name}: regression labels must be numbers ({err})") from err
        else:
            targets = _class_targets(ds.labels, classes, f"text_cls {name}")
        splits[name] = _Split(ids, mask, targets)

    def features(enc, split: _Split, idx, dev):
        return enc.text_features(split.input_ids[idx].to(dev), split.attention_mask[idx].to(dev))

    probe = splits["train"]
    dim = _feature_dim(model, lambda: features(model, probe, torch.arange(1), _param_device(model)))
    out = _run(model, features, dim, splits, 1 if regression else len(classes), regression, fcfg, device, seed,
               extra, select)
    out["num_classes"] = float(0 if regression else len(classes))
    return out


def _extra_scores(
    names: Sequence[str], regression: bool, classes: list[str] | None, positive: str
) -> ExtraScores | None:
    """The scorer of ``names`` on a split's outputs, or None when none is asked for."""
    allowed = REGRESSION_EXTRAS if regression else CLASSIFICATION_EXTRAS
    wrong = [n for n in names if n not in allowed]
    if wrong:
        kind = "regression" if regression else "classification"
        raise ValueError(f"text fine-tune: metrics {wrong} do not apply to {kind}; choose from {allowed}")
    if not names:
        return None
    positive_at = _positive_index(classes, positive) if "f1" in names else None

    def score(outputs: torch.Tensor, split: _Split) -> dict[str, float]:
        target = split.targets.numpy()
        if regression:
            return {"spearman": spearman(outputs.squeeze(-1).double().numpy(), target.astype(np.float64))}
        pred = outputs.argmax(dim=-1).numpy()
        scorers = {"mcc": lambda: matthews_corrcoef(pred, target), "f1": lambda: f1_score(pred, target, positive_at)}
        return {n: scorers[n]() for n in names}

    return score


def _positive_index(classes: list[str] | None, positive: str) -> int:
    if positive not in (classes or []):
        raise ValueError(f"text fine-tune: F1's positive label {positive!r} is not among the classes {classes}")
    return classes.index(positive)


def text_selection(
    metric: SelectionMetric, regression: bool, classes: list[str] | None, positive: str
) -> Selection:
    """The text fine-tune's epoch selection on ``metric`` (:func:`flava.eval.glue_metrics.selection_score`)."""
    allowed = REGRESSION_SELECTION if regression else CLASSIFICATION_SELECTION
    if metric not in allowed:
        kind = "regression" if regression else "classification"
        raise ValueError(f"text fine-tune: selection metric {metric!r} does not apply to {kind}; "
                         f"choose from {allowed}")
    positive_at = _positive_index(classes, positive) if metric == "f1_accuracy_mean" else 1

    def score(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        values = outputs.squeeze(-1).double().numpy() if regression else outputs.argmax(dim=-1).numpy()
        return selection_score(metric, values, targets.numpy(), positive_at)

    return Selection(metric, score)


def finetune_multimodal(
    model: torch.nn.Module,
    tokenizer,
    data: dict[str, VqaSet],
    fcfg: FinetuneConfig,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    device: torch.device | str,
    max_length: int,
    answers: list[str] | None = None,
    seed: int = 0,
) -> dict[str, float | str]:
    """Closed-answer classification head on ``model.multimodal_features`` (multimodal CLS) for VQA-style data.

    Splits with ``answer_scores`` (VQAv2) are scored by VQA accuracy (``vqa_accuracy``); their val/test answers
    may fall outside ``answers`` (a question the head cannot answer scores 0)."""
    device = torch.device(device)
    max_length = text_length(model, max_length)
    answers = answers or sorted(set(data["train"].answers))
    if len(answers) < 2:
        raise ValueError("multimodal fine-tuning needs at least two answers")
    splits = {}
    index = {a: i for i, a in enumerate(answers)}
    for name, ds in data.items():
        ids, mask = tokenize(tokenizer, ds.questions, max_length)
        open_ended = ds.answer_scores is not None
        # Out-of-set answers are no class to train on: only the scored splits may hold them (as target -1).
        targets = _class_targets(ds.answers, answers, f"vqa {name}", -1 if open_ended and name != "train" else None)
        soft = None
        if open_ended:
            soft = [{index[a]: v for a, v in scores.items() if a in index} for scores in ds.answer_scores]
        splits[name] = _Split(ids, mask, targets, list(ds.images), soft)
    cache: dict[str, ImageDataset] = {}

    def pixels(split: _Split, idx) -> torch.Tensor:
        key = str(id(split))
        if key not in cache:
            cache[key] = ImageDataset(split.images, transform)
        return torch.stack([cache[key][int(i)] for i in idx])

    def features(enc, split: _Split, idx, dev):
        return enc.multimodal_features(
            pixels(split, idx).to(dev), split.input_ids[idx].to(dev), split.attention_mask[idx].to(dev)
        )

    probe = splits["train"]
    dim = _feature_dim(model, lambda: features(model, probe, torch.arange(1), _param_device(model)))
    out = _run(model, features, dim, splits, len(answers), False, fcfg, device, seed)
    out["num_classes"] = float(len(answers))
    return out


def _param_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")

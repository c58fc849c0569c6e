"""The paper's benchmarks (``eval.benchmarks``) on an evaluated model, through the evaluation sets' code paths.

Each configured benchmark is read from its official layout (:mod:`flava.eval.official`) into the in-memory set
types and run by the same functions as the evaluation sets: ImageNet zero-shot and linear probe, COCO / Flickr30k
retrieval, GLUE and VQAv2 fine-tunes. The fine-tunes and the probe choose their epoch / C on a part of the train
split held out (``select_fraction``) and report the official dev/val split, scored as the official evaluations
score it: GLUE adds each task's official metric to its accuracy (CoLA ``mcc``, MRPC / QQP ``f1``, STS-B
``spearman`` besides ``pearson``) and chooses the epoch on the score GLUE ranks the task by (``GlueTask.select_on``,
named in the results as ``selected_on``); VQAv2's ``vqa_accuracy`` is the official one, on normalised answers.

:func:`run_benchmarks` returns ``None`` when no benchmark is configured (the evaluation's outputs are then exactly
those of the evaluation sets), else one block per benchmark: its metrics with ``chance`` (the chance level of its
headline score), or ``{"skipped": reason}``. A configured path that does not exist is an error naming its key.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Hashable, Sequence

from flava.eval.aggregate import majority_rate
from flava.eval.config import GLUE_TASK_NAMES, BenchmarksConfig
from flava.eval.context import EvalContext
from flava.eval.datasets import TextSet, VqaSet, ZeroShotSet, load_classes
from flava.eval.finetune import finetune_multimodal, finetune_text
from flava.eval.official import (
    GLUE_TASKS,
    load_glue_task,
    load_imagenet_folder,
    load_karpathy,
    load_vqav2,
    read_synset_names,
)
from flava.eval.probe import probe_sets
from flava.eval.retrieval import evaluate_retrieval_set
from flava.eval.zeroshot import set_logits, topk_accuracy

# The path keys of each benchmark section, checked before anything runs.
PATH_KEYS = {
    "imagenet": ("val", "train", "synsets"),
    "coco": ("karpathy_json", "image_root"),
    "flickr30k": ("karpathy_json", "image_root"),
    "glue": ("root",),
    "vqav2": ("val_questions", "val_annotations", "val_images", "train_questions", "train_annotations",
              "train_images"),
}
# The fields that hold one entry per row, by set type (what a held-out split takes).
_ROW_FIELDS = {
    ZeroShotSet: ("images", "labels"),
    TextSet: ("sentences", "labels", "pairs"),
    VqaSet: ("images", "questions", "answers", "answer_scores"),
}


def check_benchmark_paths(bcfg: BenchmarksConfig) -> None:
    """Every configured path exists, else ``FileNotFoundError`` naming its ``eval.benchmarks`` key."""
    for section, keys in PATH_KEYS.items():
        for key in keys:
            value = getattr(getattr(bcfg, section), key)
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"eval.benchmarks.{section}.{key}: {value} not found")
    glue = bcfg.glue
    for name in glue.tasks or ():
        missing = _glue_missing(glue.root, name)
        if missing:
            raise FileNotFoundError(f"eval.benchmarks.glue.tasks lists {name!r} but "
                                    f"{Path(glue.root) / GLUE_TASKS[name].folder} lacks {' and '.join(missing)}")


def _glue_missing(root: str, name: str) -> list[str]:
    """The files of a GLUE task that are not under ``root`` (train.tsv and the dev file)."""
    task = GLUE_TASKS[name]
    return [f for f in ("train.tsv", task.dev) if not (Path(root) / task.folder / f).is_file()]


def skipped(reason: str) -> dict[str, str]:
    return {"skipped": reason}


def held_out(n: int, fraction: float) -> list[int]:
    """Indices of about ``fraction`` of ``n`` rows, evenly spread (at least one, never all of them)."""
    if n < 2:
        raise ValueError(f"a split of {n} row(s) cannot spare a held-out selection part")
    k = min(n - 1, max(1, round(n * fraction)))
    return [(i * n) // k for i in range(k)]


def split_off(data, groups: Sequence[Hashable], fraction: float, *, whole_groups: bool) -> tuple[Any, Any]:
    """(kept, held out) rows of a set. ``whole_groups``: about ``fraction`` of the distinct groups with all their
    rows (VQA images, so questions on one image never straddle the two; GLUE rows, each its own group). Otherwise
    about ``fraction`` of each group's rows (ImageNet classes, stratified; a one-image class stays in training)."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    if whole_groups:
        keys = sorted(members, key=str)
        held = {i for j in held_out(len(keys), fraction) for i in members[keys[j]]}
    else:
        held = {m[j] for m in members.values() if len(m) >= 2 for j in held_out(len(m), fraction)}
    kept = [i for i in range(len(groups)) if i not in held]
    return _rows(data, kept), _rows(data, sorted(held))


def _rows(data, index: list[int]):
    fields = _ROW_FIELDS[type(data)]
    return dataclasses.replace(
        data, **{f: [getattr(data, f)[i] for i in index] for f in fields if getattr(data, f) is not None}
    )


def _imagenet(b: EvalContext) -> dict[str, dict[str, Any]]:
    cfg = b.ecfg.benchmarks.imagenet
    if cfg.val is None:
        reason = skipped("eval.benchmarks.imagenet.val is not set")
        return {"imagenet_zeroshot": reason, "imagenet_linear_probe": reason}
    synsets = read_synset_names(cfg.synsets)
    templates = cfg.templates or load_classes(b.eval_root)[1]
    test = load_imagenet_folder(cfg.val, synsets, templates)
    out: dict[str, dict[str, Any]] = {}
    if b.ecfg.zeroshot.enabled:
        logits, labels, _ = set_logits(b.model, b.tokenizer, test, batch_size=b.ecfg.batch_size, device=b.device,
                                       transform=b.transform, max_length=b.max_length)
        out["imagenet_zeroshot"] = {**topk_accuracy(logits, labels, b.ecfg.zeroshot.top_k),
                                    "chance": majority_rate(test.labels)}
    else:
        out["imagenet_zeroshot"] = skipped("eval.zeroshot.enabled is false")
    if not b.ecfg.probe.enabled:
        out["imagenet_linear_probe"] = skipped("eval.probe.enabled is false")
    elif cfg.train is None:
        out["imagenet_linear_probe"] = skipped("eval.benchmarks.imagenet.train is not set (the probe trains on it)")
    else:
        train = load_imagenet_folder(cfg.train, synsets, templates, cfg.probe_train_per_class)
        fit, select = split_off(train, train.labels, b.ecfg.benchmarks.select_fraction, whole_groups=False)
        metrics = probe_sets(b.model, fit, select, test, b.ecfg.probe, transform=b.transform,
                             batch_size=b.ecfg.batch_size, device=b.device, seed=b.seed)
        out["imagenet_linear_probe"] = {**metrics, "chance": majority_rate(test.labels)}
    return out


def _karpathy(b: EvalContext, name: str) -> dict[str, dict[str, Any]]:
    cfg = getattr(b.ecfg.benchmarks, name)
    key = f"{name}_retrieval"
    if cfg.karpathy_json is None:
        return {key: skipped(f"eval.benchmarks.{name}.karpathy_json is not set")}
    if not b.ecfg.retrieval.enabled:
        return {key: skipped("eval.retrieval.enabled is false")}
    data = load_karpathy(cfg.karpathy_json, cfg.image_root, cfg.split, cfg.captions_per_image)
    recall, _, chance = evaluate_retrieval_set(b.model, b.tokenizer, data, b.ecfg.retrieval, transform=b.transform,
                                               batch_size=b.ecfg.batch_size, device=b.device,
                                               max_length=b.max_length)
    return {key: {**recall, "num_images": float(len(data.images)), "chance": chance["mean_recall"]}}


def _glue(b: EvalContext) -> dict[str, dict[str, Any]]:
    cfg = b.ecfg.benchmarks.glue
    if cfg.root is None:
        return {"glue": skipped("eval.benchmarks.glue.root is not set")}
    if not b.ecfg.text_finetune.enabled:
        return {"glue": skipped("eval.text_finetune.enabled is false")}
    out: dict[str, dict[str, Any]] = {}
    for name in cfg.tasks or GLUE_TASK_NAMES:
        task = GLUE_TASKS[name]
        missing = _glue_missing(cfg.root, name)  # none when the task was listed: checked with the paths
        if missing:
            out[f"glue_{name}"] = skipped(f"no {' or '.join(missing)} in {Path(cfg.root) / task.folder}")
            continue
        train, dev = load_glue_task(cfg.root, name)
        fit, select = split_off(train, range(len(train.labels)), b.ecfg.benchmarks.select_fraction, whole_groups=True)
        fcfg = b.ecfg.text_finetune.model_copy(
            update={"task": "regression" if task.regression else "classification"}
        )
        metrics = finetune_text(b.model, b.tokenizer, {"train": fit, "val": select, "test": dev}, fcfg,
                                device=b.device, max_length=b.max_length, seed=b.seed,
                                extra_metrics=task.metrics, select_on=task.select_on)
        out[f"glue_{name}"] = {**metrics, "chance": 0.0 if task.regression else majority_rate(dev.labels)}
    return out


def _answer_classes(answers: Sequence[str], limit: int) -> list[str]:
    """The ``limit`` most frequent answers (ties in name order, so the classes do not depend on row order)."""
    counts = Counter(answers)
    return sorted(counts, key=lambda a: (-counts[a], a))[:limit]


def _vqav2(b: EvalContext) -> dict[str, dict[str, Any]]:
    cfg = b.ecfg.benchmarks.vqav2
    if cfg.val_questions is None:
        return {"vqav2": skipped("eval.benchmarks.vqav2.val_questions is not set")}
    if not b.ecfg.multimodal_finetune.enabled:
        return {"vqav2": skipped("eval.multimodal_finetune.enabled is false")}
    if cfg.train_questions is None:
        return {"vqav2": skipped("fine-tuning needs the train2014 split: eval.benchmarks.vqav2.train_questions, "
                                 "train_annotations and train_images are not set")}
    test = load_vqav2(cfg.val_questions, cfg.val_annotations, cfg.val_images)
    train = load_vqav2(cfg.train_questions, cfg.train_annotations, cfg.train_images)
    fit, select = split_off(train, train.images, b.ecfg.benchmarks.select_fraction, whole_groups=True)
    answers = _answer_classes(fit.answers, cfg.num_answers)
    classes = set(answers)
    fit = _rows(fit, [i for i, a in enumerate(fit.answers) if a in classes])  # the usual VQA head: no class, no row
    metrics = finetune_multimodal(b.model, b.tokenizer, {"train": fit, "val": select, "test": test},
                                  b.ecfg.multimodal_finetune, transform=b.transform, device=b.device,
                                  max_length=b.max_length, answers=answers, seed=b.seed)
    # Chance: the best constant answer's VQA accuracy on the reported split.
    totals: Counter[str] = Counter()
    for scores in test.answer_scores:
        totals.update(scores)
    return {"vqav2": {**metrics, "chance": max(totals.values()) / len(test.answers)}}


def run_benchmarks(ctx: EvalContext) -> dict[str, dict[str, Any]] | None:
    """``{benchmark: metrics | {"skipped": reason}}`` for the model and settings of ``ctx``, or None when
    ``eval.benchmarks`` configures none."""
    if not ctx.ecfg.benchmarks.configured:
        return None
    check_benchmark_paths(ctx.ecfg.benchmarks)
    out: dict[str, dict[str, Any]] = {}
    out.update(_imagenet(ctx))
    out.update(_karpathy(ctx, "coco"))
    out.update(_karpathy(ctx, "flickr30k"))
    out.update(_glue(ctx))
    out.update(_vqav2(ctx))
    return out

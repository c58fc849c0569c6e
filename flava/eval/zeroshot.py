"""CLIP-style zero-shot image classification with prompt templates.

Each class is represented by the mean of its L2-normalised prompt embeddings (one prompt per template, e.g.
"a photo of a {}."), renormalised; an image is assigned the class whose embedding has the largest cosine
similarity with the image embedding. The training stage calls :func:`evaluate_zeroshot` to select checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from flava.data.stream_config import TokenizerConfig
from flava.eval.config import EvalConfig, ZeroShotConfig
from flava.eval.datasets import ZeroShotSet, load_zeroshot
from flava.eval.features import default_transform, encode_images, encode_texts, model_device, pick_device

_DEFAULTS = EvalConfig()
_TEXT_DEFAULTS = TokenizerConfig()  # the pipeline passes cfg.data.tokenizer.max_length


def class_embeddings(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int,
    device: torch.device | str,
    max_length: int,
) -> torch.Tensor:
    """(C, P): per class, the renormalised average of its normalised template embeddings."""
    prompts = [template.format(name) for name in classnames for template in templates]
    emb = encode_texts(model, tokenizer, prompts, batch_size=batch_size, device=device, max_length=max_length)
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1)  # (C, T, P)
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}``; K above the number of classes counts every prediction as a hit."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits (N, C) and labels (N,) expected, got {tuple(logits.shape)}, {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty set")
    kmax = min(max(ks), logits.shape[1])
    ranked = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = (ranked == labels[:, None]).cumsum(dim=1) > 0
    return {f"top{k}": hit[:, min(k, kmax) - 1].float().mean().item() for k in ks}


def mean_reciprocal_rank(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of 1 / (rank of the true class), rank 1 = the top prediction: a smooth companion of top-1 that moves
    while a model's top-1 is still at chance (a sweep's pruner compares trials on it early on)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits (N, C) and labels (N,) expected, got {tuple(logits.shape)}, {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("cannot compute a rank on an empty set")
    true = logits.gather(1, labels[:, None])  # (N, 1)
    rank = 1 + (logits > true).sum(dim=1)  # ties count in the true class's favour
    return (1.0 / rank.double()).mean().item()


def zeroshot_logits(
    model: torch.nn.Module,
    tokenizer,
    eval_root: str | Path,
    split: str = "val",
    *,
    batch_size: int,
    device: torch.device | str,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    max_length: int = _TEXT_DEFAULTS.max_length,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(cosine logits (N, C), labels (N,), classnames) for one split."""
    return set_logits(
        model, tokenizer, load_zeroshot(eval_root, split), batch_size=batch_size, device=device, transform=transform,
        max_length=max_length,
    )


def set_logits(
    model: torch.nn.Module,
    tokenizer,
    data: ZeroShotSet,
    *,
    batch_size: int,
    device: torch.device | str,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    max_length: int = _TEXT_DEFAULTS.max_length,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """:func:`zeroshot_logits` for a set already in memory (e.g. ImageNet read from its official layout)."""
    if transform is None:
        transform = default_transform(model)
    classes = class_embeddings(
        model, tokenizer, data.classnames, data.templates, batch_size=batch_size, device=device, max_length=max_length
    )
    images = encode_images(model, data.images, transform, batch_size=batch_size, device=device)
    logits = F.normalize(images, dim=-1) @ classes.T  # (N, C)
    return logits, torch.tensor(data.labels, dtype=torch.long), data.classnames


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer,
    eval_root: str | Path,
    split: str = "val",
    *,
    batch_size: int = _DEFAULTS.batch_size,
    device: torch.device | str | None = None,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    max_length: int = _TEXT_DEFAULTS.max_length,
    top_k: Sequence[int] = tuple(ZeroShotConfig().top_k),
) -> dict[str, float]:
    """Zero-shot top-K accuracy and mean reciprocal rank on ``eval_root/zeroshot/{split}.jsonl``
    -> ``{"top1": ..., "top5": ..., "mrr": ...}``.

    ``device`` is where the inputs go (default: where the model's parameters live; ``"auto"`` picks CUDA when
    present); the model must already live there. Its train/eval flag is restored afterwards.
    """
    device = model_device(model) if device is None else pick_device(str(device))
    logits, labels, _ = zeroshot_logits(
        model, tokenizer, eval_root, split, batch_size=batch_size, device=device, transform=transform,
        max_length=max_length,
    )
    return {**topk_accuracy(logits, labels, top_k), "mrr": mean_reciprocal_rank(logits, labels)}


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    pred = logits.argmax(dim=1)
    flat = labels * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)

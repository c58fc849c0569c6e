"""Feature extraction shared by the evaluation tasks: device choice, tokenisation, batched no-grad encoding.

The evaluated model is never mutated: encoding runs under :func:`eval_mode`, which restores the model's
train/eval flag afterwards, and the fine-tuners work on deep copies.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from flava.data.stream_config import LoaderConfig
from flava.data.transforms import image_transform
from flava.eval.datasets import ImageDataset


def default_transform(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """Eval transform for a model when no pipeline config is at hand: the model's image size and the default
    ``data.loader`` normalisation. Stages holding a config pass ``transform_from_config(cfg, train=False)``."""
    size = getattr(getattr(getattr(model, "config", None), "image", None), "image_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(model).__name__} exposes no config.image.image_size; pass transform=...")
    loader = LoaderConfig()
    return image_transform(size, train=False, mean=loader.mean, std=loader.std, resample=loader.resample)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def tokenize(
    tokenizer, texts: Sequence[str], max_length: int, pairs: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts (or sentence pairs ``[CLS] a [SEP] b [SEP]``) -> ``input_ids`` and ``attention_mask`` (B, T), padded
    to the longest, truncated at max_length (pairs: the longer sentence first)."""
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} first sentences but {len(pairs)} second sentences")
    enc = tokenizer(
        list(texts), list(pairs) if pairs is not None else None, padding=True, truncation=True,
        max_length=max_length, return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def text_length(model: torch.nn.Module, requested: int) -> int:
    """``requested`` capped by the model's text positions (``config.text.max_position_embeddings``) if known."""
    config = getattr(model, "config", None)
    limit = getattr(getattr(config, "text", None), "max_position_embeddings", None)
    return min(requested, int(limit)) if isinstance(limit, int) else requested


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    paths: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int,
    device: torch.device | str,
    method: str = "encode_image",
    num_workers: int = 0,
) -> torch.Tensor:
    """``model.<method>(pixel_values)`` over all images -> (N, D) float32 on the CPU."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ImageDataset(paths, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    fn = getattr(model, method)
    out = []
    with eval_mode(model):
        for pixel_values in loader:
            out.append(fn(pixel_values.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int,
    device: torch.device | str,
    max_length: int,
    method: str = "encode_text",
) -> torch.Tensor:
    """``model.<method>(input_ids, attention_mask)`` over all texts -> (N, D) float32 on the CPU."""
    device = torch.device(device)
    fn = getattr(model, method)
    max_length = text_length(model, max_length)
    out = []
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            ids, mask = tokenize(tokenizer, texts[start : start + batch_size], max_length)
            out.append(fn(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)

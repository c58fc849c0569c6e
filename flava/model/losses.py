"""FLAVA's objectives as plain functions on tensors, and the weighted combination of them.

Every masked-prediction loss is the mean cross-entropy over the masked positions only, over the global batch:
with ``world_size`` > 1 each rank divides its sum by its share of the global count (``per_rank_share``), so the
gradient DDP averages equals the single-process one however the masked positions fall on the ranks. When a batch
has no masked position the loss is an exact 0 that still has a gradient path (transformers' FLAVA returns NaN).
The global contrastive loss gathers the embeddings of every rank through ``flava.distributed.gather_features``
(gradients flow into this rank's slice) and never touches ``torch.distributed`` at world size 1.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from flava.distributed import gather_features, per_rank_share

IGNORE_INDEX = -100  # label value of positions that carry no target (BERT / transformers convention)


def masked_prediction_loss(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor, *, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``head`` at the positions where ``labels`` != -100.

    hidden (B, T, H), labels (B, T) -> (loss, accuracy), both scalars; loss = 0 (with a grad path) if nothing is
    masked. Only the masked positions go through the head, so a 30k-word decoder runs on ~15 % of the tokens.
    The loss is this rank's share of the global mean (see the module doc); the accuracy is this rank's."""
    selected = labels != IGNORE_INDEX  # (B, T)
    targets = labels[selected]  # (N,)
    logits = head(hidden[selected])  # (N, V)
    count = selected.sum().clamp(min=1).to(torch.float32)  # not the logits dtype: bf16 rounds counts > 256
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / per_rank_share(selected.sum(), world_size)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == targets).sum().to(torch.float32) / count
    return loss, accuracy


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the global batch (CLIP / FLAVA Sec. 3.3).

    image_embeddings, text_embeddings: (B, P), L2-normalised. ``logit_scale`` is log(1 / temperature). Each local
    image is scored against every text of every rank and vice versa; the positive of local row i is global
    column ``rank * B + i``. ``rows`` (B,) bool restricts the loss to some local rows (pairs known to match).
    Returns (loss, image->text top-1 accuracy)."""
    batch = image_embeddings.shape[0]
    all_images = gather_features(image_embeddings, rank, world_size)  # (W*B, P)
    all_texts = gather_features(text_embeddings, rank, world_size)
    # Logits reach ln(100) * 1 = 100 where bf16 keeps ~2 significant digits: compute this small (B, W*B) part in fp32.
    with torch.autocast(device_type=image_embeddings.device.type, enabled=False):
        scale = logit_scale.float().exp()
        logits_per_image = scale * image_embeddings.float() @ all_texts.float().t()  # (B, W*B)
        logits_per_text = scale * text_embeddings.float() @ all_images.float().t()
    labels = torch.arange(batch, device=image_embeddings.device) + rank * batch
    share = float(batch)  # every rank scores B rows
    if rows is not None:  # the matched rows differ in number per rank: their global mean (see the module doc)
        logits_per_image, logits_per_text, labels = logits_per_image[rows], logits_per_text[rows], labels[rows]
        share = per_rank_share(rows.sum(), world_size)
    summed = F.cross_entropy(logits_per_image.float(), labels, reduction="sum") + F.cross_entropy(
        logits_per_text.float(), labels, reduction="sum")
    loss = summed / (2 * share)
    with torch.no_grad():
        accuracy = (logits_per_image.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, 2), labels (B,) with 1 = matched -> (cross-entropy, accuracy)."""
    loss = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy


class WeightedObjective:
    """Combines the unweighted objectives of one batch with fixed weights; keeps the parts for logging."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)

    def enabled(self, name: str) -> bool:
        return self.weights.get(name, 0.0) > 0

    def __call__(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        if not losses:
            raise ValueError("no objective was computed for this batch")
        return sum(self.weights[name] * value for name, value in losses.items())

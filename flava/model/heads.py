"""Prediction heads on top of the towers.

- ``MaskedPredictionHead``: dense -> activation -> LayerNorm -> vocabulary logits (BERT's LM head), used for MIM
  and MMM-image (codebook vocabulary) and for MLM and MMM-text (WordPiece vocabulary).
- ``ITMHead``: tanh pooler on the multimodal CLS, then a 2-way matched / not-matched classifier.
The contrastive projections are plain ``nn.Linear`` layers on the model itself.
"""
from __future__ import annotations

import torch
from torch import nn

from flava.model.layers import ACTIVATIONS, LayerNorm


class HeadTransform(nn.Module):
    def __init__(self, width: int, eps: float, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]
        self.norm = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class MaskedPredictionHead(nn.Module):
    """(N, width) hidden states of masked positions -> (N, vocab_size) logits."""

    def __init__(self, width: int, vocab_size: int, eps: float, act: str = "gelu") -> None:
        super().__init__()
        self.transform = HeadTransform(width, eps, act)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class ITMHead(nn.Module):
    """(B, width) multimodal CLS -> (B, 2) logits; class 1 = the image and the text match."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls)))

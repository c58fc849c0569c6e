"""Typed configuration of the training stages (``train:`` in params.yaml). Skeleton; the trainer extends it."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

"""Typed configuration of the data stages (``data:`` in params.yaml). Skeleton; the data stages extend it."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

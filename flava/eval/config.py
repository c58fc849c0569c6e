"""Typed configuration of evaluation and promotion (``eval:`` in params.yaml). Skeleton; evaluation extends it."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

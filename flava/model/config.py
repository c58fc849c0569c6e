"""Typed model configuration: one small config per tower and named presets (owned by the model library).

Placeholder written by the skeleton; the model library replaces it with the tower configs and presets.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelSection(BaseModel):
    """The ``model:`` section of params.yaml: a named preset plus field overrides."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "small"
    overrides: dict[str, Any] = Field(default_factory=dict)

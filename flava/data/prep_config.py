"""Typed config of data preparation: synthetic generation, ingestion, validation. Owned by those stages."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateConfig(_Section):
    """The embedded synthetic world (``flava data generate``)."""


class IngestConfig(_Section):
    """Ingestion of raw corpora into per-corpus manifests (``flava data prepare``)."""


class ValidateConfig(_Section):
    """Great Expectations validation (``flava data validate``)."""

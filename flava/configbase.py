"""What every typed config section shares: the strict pydantic base and the deep merge that lays presets and
overrides.

It sits below ``flava.config`` and every stage's config module (the model library's included) and imports no
project module, so each of them can import it without an import cycle.
"""
from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` laid over it (a copy; inputs are not modified): a dict value merges into a dict,
    anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class StrictModel(BaseModel):
    """Base of every config section: an unknown key is an error naming it (a typo never silently falls back to
    a default)."""

    model_config = ConfigDict(extra="forbid")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict -> ``{"a.b.c": leaf}`` (an empty nested dict stays a leaf ``{}``)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}

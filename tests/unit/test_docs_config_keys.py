"""Every config key the docs name (`eval.registry.margin` in backticks, `--set train.joint.steps=...`, `-S ...`)
exists in ``PipelineConfig``: a renamed or invented key in README.md, infra/README.md or docs/*.md fails here."""
from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flava.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "infra" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Dotted names that start like a config section but are files (`data.dvc`, `model.safetensors`).
FILE_SUFFIXES = {"dvc", "json", "jsonl", "yaml", "yml", "md", "py", "lock", "txt", "html", "csv", "db", "tar", "png",
                 "jpg", "safetensors", "parquet", "toml", "cfg"}
SPAN = re.compile(r"`([^`]+)`")  # inline code may wrap onto the next line
OVERRIDE = re.compile(r"(?:--set[= ]|-S )['\"]?([A-Za-z_][\w.]*)=")
KEY = re.compile(r"(?<![\w./$-])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?![\w/(-])")
SECTIONS = set(PipelineConfig.model_fields)


def config_keys(text: str) -> set[str]:
    """Dotted config keys named in ``text``: inside backticks, or as the key of a ``--set``/``-S`` override."""
    found = set(OVERRIDE.findall(text))
    for span in SPAN.findall(text):
        found.update(KEY.findall(span))
    return {k for k in found if k.split(".")[0] in SECTIONS and k.rsplit(".", 1)[-1] not in FILE_SUFFIXES}


def _model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple):
        for arg in typing.get_args(annotation):
            if (model := _model(arg)) is not None:
                return model
    return None


def _free_form(annotation) -> bool:
    if annotation is dict or typing.get_origin(annotation) is dict or annotation is typing.Any:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(
        _free_form(a) for a in typing.get_args(annotation))


def key_exists(key: str) -> bool:
    annotation: typing.Any = PipelineConfig
    for part in key.split("."):
        model = _model(annotation)
        if model is None:
            return _free_form(annotation)  # a mapping of user keys (e.g. model overrides): anything below
        if part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
    return True


def test_the_checker_finds_keys_and_catches_wrong_ones():
    text = ("better by `eval.gate.margin`, see `eval.registry.margin` and `train.strategy: fsdp`; "
            "`data.dvc`, `model.safetensors`, `flava.data.fit`, `data/raw.dvc` are not keys.\n"
            "    flava pretrain joint --set train.joint.steps=50\n    dvc exp run -S data.loader.num_workers=2\n")
    keys = config_keys(text)
    assert keys == {"eval.gate.margin", "eval.registry.margin", "train.strategy", "train.joint.steps",
                    "data.loader.num_workers"}
    assert [k for k in sorted(keys) if not key_exists(k)] == ["eval.gate.margin"]
    assert not key_exists("eval.registry.margin.x") and not key_exists("tracking.uri")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_named_in_the_docs_exists(doc):
    missing = sorted(k for k in config_keys(doc.read_text()) if not key_exists(k))
    assert not missing, f"{doc.relative_to(ROOT)} names config keys that PipelineConfig does not have: {missing}"

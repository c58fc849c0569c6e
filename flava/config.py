"""The one source of truth for configuration: ``params.yaml`` -> a typed, validated ``PipelineConfig``.

Each stage owns the typed section it reads (``flava.data.config``, ``flava.model.config``, ``flava.train.config``,
``flava.eval.config``); this module composes them, applies ``key.path=value`` overrides (from the CLI, Prefect
parameters or Optuna trials) and flattens the effective config for logging.
Importing this module has no side effects: no directories are created and no tracking URI is set.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, Field, model_validator

from flava.configbase import StrictModel, flatten
from flava.data.config import DataConfig
from flava.eval.config import EvalConfig
from flava.launch.config import LaunchConfig
from flava.model.config import ModelSection
from flava.train.config import TrainConfig


class PathsConfig(StrictModel):
    """Where each stage reads and writes, relative to the project root unless absolute (or an s3:// URI)."""

    raw: str = "data/raw"
    prepared: str = "data/prepared"
    validated: str = "data/validated"
    shards: str = "data/shards"  # where the shard tars are written: a local directory or s3://bucket/prefix
    # The local directory DVC tracks for the shard stage: each corpus' index.json, and the tars themselves when
    # they are written here. With shards elsewhere (s3://) each index records their location, so the stages
    # downstream depend on the index (names, sizes, sha256) and never on a remote directory DVC cannot track.
    # Left out, it follows a local `shards`.
    shard_index: str = "data/shards"
    artifacts: str = "artifacts"
    models: str = "models"
    checkpoints: str = "checkpoints"  # trainer state for resume; outside DVC outs so a re-run can resume
    reports: str = "reports"

    @model_validator(mode="after")
    def _shard_index_is_local(self):
        if "://" in self.shard_index:
            raise ValueError(f"paths.shard_index must be a local directory (DVC tracks it), got {self.shard_index!r}; "
                             "the shards themselves go to paths.shards, which may be s3://bucket/prefix")
        if "shard_index" not in self.model_fields_set and "://" not in self.shards:
            self.shard_index = self.shards
        return self


class TrackingConfig(StrictModel):
    """MLflow. ``tracking_uri`` is used unless the environment sets MLFLOW_TRACKING_URI (a shared server)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str | None = None
    experiment: str = "flava"
    log_system_metrics: bool = True


class PipelineConfig(StrictModel):
    seed: int = 0
    paths: PathsConfig = Field(default_factory=PathsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="after")
    def _texts_fit_the_model(self):
        positions = self.model.resolved.text.max_position_embeddings
        if self.data.tokenizer.max_length > positions:
            raise ValueError(
                f"data.tokenizer.max_length ({self.data.tokenizer.max_length}) exceeds the model's text positions "
                f"({positions}, model.preset {self.model.preset!r}): lower it or raise "
                "model.overrides.text.max_position_embeddings"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Flattened ``{"a.b.c": value}`` view, as logged to MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        """Stable short hash of the effective config (lineage tag ``params_hash``)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.joint.steps=200"`` -> (["train", "joint", "steps"], 200). The value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key segment")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply overrides to a raw params tree (a copy is returned). Unknown keys fail later in validation."""
    tree = json.loads(json.dumps(tree))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else key
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def load_config(
    path: str | Path = "params.yaml", overrides: Iterable[str] | dict[str, Any] = ()
) -> PipelineConfig:
    """Read ``params.yaml``, apply overrides and validate. Errors name the offending field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path} must hold a mapping at top level")
    return PipelineConfig.model_validate(apply_overrides(tree, overrides))


def dump_config(cfg: PipelineConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


# ------------------------------------------------------------------------------------- which keys a stage reads
class ReadRecorder:
    """Records the dotted keys of ``params.yaml`` that code reads from a loaded config, by attribute access.

    Used to check that every stage declares (in ``flava.stages``, hence ``dvc.yaml``) each params key it reads:
    a key read but not declared is a change DVC would not re-run the stage for. Pydantic's own dumps
    (``model_dump``, ``flat``, ``digest``: logging and hashing the whole config) are not reads and go unrecorded.
    Sections reached by attribute are not recorded themselves, only the leaves read from them; a list of
    sections records its key once, without indexes. Recording patches ``__getattribute__`` of the config's
    classes, so it is for test and audit runs only (``$FLAVA_RECORD_READS``, see ``flava.cli``).
    """

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self._paths: dict[int, str] = {}
        self._patched: dict[type, Any] = {}
        self._dumping = [0]  # > 0 while a pydantic dump runs (it reads union discriminators by attribute)
        self._dumps: dict[str, Any] = {}

    def watch(self, cfg: BaseModel) -> None:
        self._walk(cfg, "")
        for name in ("model_dump", "model_dump_json"):
            original = self._dumps[name] = getattr(BaseModel, name)
            setattr(BaseModel, name, self._paused(original))
        hook = self._hook()
        for cls in {type(cfg)} | self._classes(cfg):
            if cls not in self._patched:
                self._patched[cls] = cls.__dict__.get("__getattribute__")
                cls.__getattribute__ = hook  # type: ignore[method-assign]

    def _paused(self, dump):
        depth = self._dumping

        def paused(model, *args, **kwargs):
            depth[0] += 1
            try:
                return dump(model, *args, **kwargs)
            finally:
                depth[0] -= 1

        return paused

    def stop(self) -> None:
        for name, original in self._dumps.items():
            setattr(BaseModel, name, original)
        self._dumps.clear()
        for cls, original in self._patched.items():
            if original is None:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = original  # type: ignore[method-assign]
        self._patched.clear()

    def _walk(self, node: Any, prefix: str) -> None:
        if isinstance(node, BaseModel):
            self._paths[id(node)] = prefix
            for name in type(node).model_fields:
                self._walk(node.__dict__[name], f"{prefix}{name}.")
        elif isinstance(node, (list, tuple)):
            for item in node:
                self._walk(item, prefix)

    def _classes(self, node: Any) -> set[type]:
        found: set[type] = set()
        if isinstance(node, BaseModel):
            found.add(type(node))
            for name in type(node).model_fields:
                found |= self._classes(node.__dict__[name])
        elif isinstance(node, (list, tuple)):
            for item in node:
                found |= self._classes(item)
        return found

    def _hook(self):
        paths, keys, dumping = self._paths, self.keys, self._dumping

        def getattribute(obj: Any, name: str) -> Any:
            value = object.__getattribute__(obj, name)
            if not dumping[0] and not name.startswith("_") and name in type(obj).model_fields:
                prefix = paths.get(id(obj))
                if prefix is not None and not _is_section(value):
                    keys.add(prefix + name)
            return value

        return getattribute


def _is_section(value: Any) -> bool:
    if isinstance(value, BaseModel):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, BaseModel) for v in value)

"""Save and load a ``FlavaForPretraining`` as a directory: ``model.safetensors`` (weights), ``config.json``
(the ``FlavaConfig`` + a format tag) and, when the model holds one, ``codebook/`` (its image codebook).

Loading never unpickles: weights come from safetensors, the config from JSON validated by pydantic.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from flava.configbase import deep_merge
from flava.model.codebook import load_codebook
from flava.model.config import FlavaConfig
from flava.model.pretraining import FlavaForPretraining

FORMAT = "flava-pretraining"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CODEBOOK_DIR = "codebook"


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                 metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with byte-deterministic output: the same tensors and metadata always give
    the same bytes.

    safetensors keeps the header's metadata in a Rust ``HashMap``, so with two keys or more their order (hence the
    file's bytes and its DVC hash) changes from one process to the next. The header is rewritten here with the
    metadata keys sorted; the tensor entries and the data are left as written (their order is already fixed)."""
    path = Path(path)
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    if not metadata or len(metadata) < 2:
        return
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))  # dicts keep the file's order for every other key
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same entries re-serialised: in place, padded with spaces as safetensors does
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
            return
        text += b" " * (-len(text) % 8)  # a longer header (other JSON escaping): the data moves behind it
        tmp = path.with_name(path.name + ".hdr")
        with tmp.open("wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(f, out)
    os.replace(tmp, path)


def save_model(model: FlavaForPretraining, directory: str | Path) -> Path:
    """Write ``model`` to ``directory`` (created if needed; files are replaced atomically one by one)."""
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    model = getattr(model, "_orig_mod", model)  # and a torch.compile'd one
    if not isinstance(model, FlavaForPretraining):
        raise ValueError(f"save_model expects a FlavaForPretraining, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_tensors(state, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.replace(tmp, directory / WEIGHTS)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.model_dump(mode="json")}
    tmp = directory / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, directory / CONFIG)
    if model.codebook is not None:
        model.codebook.save(directory / CODEBOOK_DIR)
    return directory


def load_config_file(directory: str | Path) -> FlavaConfig:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (not a flava.model.io directory?)")
    payload = json.loads(path.read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {payload.get('format')!r}, expected {FORMAT!r}")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {payload['format_version']} is newer than this code's "
                         f"{FORMAT_VERSION}")
    return FlavaConfig.model_validate(payload["config"])


def load_model(
    directory: str | Path,
    *,
    config_overrides: dict[str, Any] | None = None,
    with_codebook: bool = True,
    device: str | torch.device = "cpu",
) -> FlavaForPretraining:
    """Rebuild the model saved in ``directory``.

    ``config_overrides`` changes non-architectural settings at load time (e.g. ``{"attention": "eager"}`` or
    loss weights); an override that changes a weight's shape fails with the offending parameter names."""
    directory = Path(directory)
    config = load_config_file(directory)
    if config_overrides:
        config = FlavaConfig.model_validate(deep_merge(config.model_dump(), config_overrides))
    codebook = None
    if with_codebook and (directory / CODEBOOK_DIR).exists():
        codebook = load_codebook(directory / CODEBOOK_DIR)
    model = FlavaForPretraining(config, codebook=codebook)
    weights = directory / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found")
    state = load_file(str(weights), device=str(device))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{weights} does not fit the config: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:8]]}"
        )
    model.load_state_dict(state)
    return model.to(device)

"""Start a model from a pretrained checkpoint on disk: a transformers FLAVA directory (``save_pretrained`` layout,
e.g. a downloaded ``facebook/flava-full``) or one of our ``flava.model.io`` directories.

:func:`load_pretrained_weights` copies every weight of the checkpoint into a model built from *our* config and
refuses, naming the tensors, when the two do not fit (a missing, extra or differently shaped tensor); the
architecture fields that differ are named too, so the fix (``model.overrides``, the tokenizer, the codebook) is
plain. Only the pretraining heads may be absent (a bare ``FlavaModel`` checkpoint): they keep their fresh
initialisation and are reported. Never downloads, never unpickles.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from flava.configbase import flatten
from flava.model.config import FlavaConfig
from flava.model.hf import checkpoint_weight_files, is_transformers_checkpoint, read_transformers_checkpoint
from flava.model.io import WEIGHTS, load_model
from flava.model.pretraining import FlavaForPretraining

log = logging.getLogger(__name__)

HEADS = ("mim_head.", "mlm_head.", "mmm_image_head.", "mmm_text_head.", "itm_head.")
# Config fields that shape no weight: they may differ between a checkpoint and the model it starts.
_RUNTIME_FIELDS = ("loss.", "attention", "activation_checkpointing", "validate_inputs", "touch_unused_parameters",
                   "initializer_range", "logit_scale_", "image.dropout", "text.dropout", "multimodal.dropout",
                   "image.attention_dropout", "text.attention_dropout", "multimodal.attention_dropout")


def read_checkpoint(directory: str | Path) -> tuple[FlavaConfig, dict[str, torch.Tensor]]:
    """(the checkpoint's own config, its weights under our names) for either kind of checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained checkpoint {directory} is not a directory")
    if is_transformers_checkpoint(directory):
        cfg, state, _ = read_transformers_checkpoint(directory)
        return cfg, state
    source = load_model(directory, with_codebook=False)
    return source.config, source.state_dict()


def checkpoint_sha256(directory: str | Path) -> str:
    """Content hash of a checkpoint's weights: sha256 of its one safetensors file, or of the ``name:sha256`` lines
    of its shards (so the same files give the same hash wherever they sit)."""
    directory = Path(directory)
    files = checkpoint_weight_files(directory) if is_transformers_checkpoint(directory) else [directory / WEIGHTS]
    digests = []
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests.append((path.name, digest.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{name}:{h}\n" for name, h in digests).encode()).hexdigest()


def architecture_differences(source: FlavaConfig, target: FlavaConfig) -> list[str]:
    """``field: checkpoint value != model value`` for each weight-shaping config field that differs."""
    a, b = flatten(source.model_dump()), flatten(target.model_dump())
    return [f"{key}: {a.get(key)} != {b.get(key)}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and not key.startswith(_RUNTIME_FIELDS)]


def load_pretrained_weights(model: FlavaForPretraining, directory: str | Path) -> dict[str, int]:
    """Copy the checkpoint in ``directory`` into ``model`` (in place) -> parameters copied per top-level part.

    Raises ``ValueError`` naming the mismatched tensors (missing, unexpected, or shape checkpoint vs model) and the
    architecture fields behind them when the checkpoint does not fit ``model.config``."""
    source_cfg, state = read_checkpoint(directory)
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(HEADS))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:8]]
        differences = architecture_differences(source_cfg, model.config)
        raise ValueError(
            f"pretrained checkpoint {directory} does not fit the model's config: "
            f"{len(wrong)} tensors of another shape (checkpoint vs model) {shapes}, "
            f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}; "
            f"config fields that differ (checkpoint != model): {differences[:12]}. Set model.overrides to the "
            "checkpoint's architecture, and data.tokenizer.pretrained_dir / data.codebook.dalle_dir to its "
            "tokenizer and codebook"
        )
    fresh = sorted(set(expected) - set(state))
    if fresh:
        log.warning("checkpoint %s has no weights for %d head tensors (kept freshly initialised): %s", directory,
                    len(fresh), fresh[:8])
    model.load_state_dict(state, strict=False)
    copied: dict[str, int] = {}
    for name, tensor in state.items():
        part = name.split(".", 1)[0]
        copied[part] = copied.get(part, 0) + tensor.numel()
    return dict(sorted(copied.items()))

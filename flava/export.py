"""Export a ``flava.model.io`` model directory in the Hugging Face transformers FLAVA format: the model, its
processor (tokenizer + image processor) and a model card.

``export_hf(model_dir, out_dir, tokenizer_dir=...)`` writes one directory that
``transformers.FlavaForPreTraining.from_pretrained`` and ``transformers.FlavaModel.from_pretrained`` both load,
and that ``FlavaProcessor`` / ``AutoProcessor`` / ``AutoTokenizer`` read:

- ``config.json`` + ``model.safetensors``: transformers' ``FlavaConfig`` and weights converted by
  ``flava.model.hf`` and ``flava.model.hf_export``. transformers' three tower poolers take no part in FLAVA pretraining and have no
  counterpart in our model; they are written with transformers' own initialisation (normal(0,
  ``initializer_range``) weights, zero biases, from a fixed seed) so loading reports no missing weight.
  A DALL-E codebook travels as ``image_codebook.*`` (``init_codebook: true``); a k-means codebook cannot live
  inside transformers' model and is copied to ``codebook/`` (MIM labels must then be passed as ``mim_labels``).
- ``tokenizer.json`` / ``tokenizer_config.json`` (from ``tokenizer_dir``), with ``model_max_length`` set to the
  text encoder's positions;
- ``processor_config.json`` (and ``preprocessor_config.json`` for older readers): a FLAVA image processor that
  reproduces our evaluation transform (shorter side resized to the image size, centre crop, ``data.loader``
  mean/std and resampling), block masking as ``data.masking`` sets it, and the codebook's input view
  (the model's own pixels for k-means; 8x the patch grid, unnormalised and logit-Laplace mapped for DALL-E);
- ``README.md``: the model card (given, or a short generated one).

Everything is built from local files; nothing is downloaded. The directory is written beside ``out_dir`` and
moved into place at the end, so a failed export never leaves half a directory behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers import AutoTokenizer, FlavaProcessor
from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil

from flava.data.config import DataConfig
from flava.model import hf
from flava.model.codebook import DalleCodebook
from flava.model.config import FlavaConfig
from flava.model.hf_export import transformers_state
from flava.model.io import load_model
from flava.model.pretraining import count_parameters

WEIGHTS = "model.safetensors"
MODEL_CARD = "README.md"
CODEBOOK_DIR = "codebook"
# transformers' FlavaImageProcessor maps DALL-E codebook pixels with this fixed epsilon (LOGIT_LAPLACE_EPS).
HF_CODEBOOK_EPS = 0.1
# PIL resampling filter ids, as transformers' image processors store them.
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def export_hf(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path,
    model_card: str | None = None,
    data: DataConfig | None = None,
) -> Path:
    """Write the transformers-format export of the model in ``model_dir`` to ``out_dir`` and return it.

    ``tokenizer_dir`` is a ``BertTokenizerFast.save_pretrained`` directory (the pipeline's
    ``artifacts/tokenizer``); ``data`` is the pipeline's ``data:`` section, whose ``loader`` (normalisation,
    resampling, codebook pixel epsilon) and ``masking`` (block masking) settings go into the processor config
    (default: the embedded pipeline's defaults). Raises ``ValueError`` when the model, tokenizer or settings
    cannot be expressed in transformers' format, ``FileNotFoundError`` when an input directory is missing.
    """
    model_dir, out_dir, tokenizer_dir = Path(model_dir), Path(out_dir), Path(tokenizer_dir)
    data = data if data is not None else DataConfig()
    for name, path in (("model_dir", model_dir), ("tokenizer_dir", tokenizer_dir)):
        if not path.is_dir():
            raise FileNotFoundError(f"export_hf: {name} {path} is not a directory")
    _check_out_dir(out_dir)

    model = load_model(model_dir)
    cfg = model.config
    hf.check_transformers_compatible(cfg)  # ValueError naming the field
    codebook = model.codebook
    dalle = codebook if isinstance(codebook, DalleCodebook) else None

    tokenizer = load_tokenizer(tokenizer_dir, cfg)
    hf_config = hf.to_transformers_config(cfg, dalle)
    hf_config.architectures = ["FlavaForPreTraining"]
    state = transformers_state(model, hf_config)
    processor = build_processor(cfg, tokenizer, codebook, data)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        hf_config.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))  # processor_config.json + tokenizer files
        processor.image_processor.save_pretrained(str(staging))  # preprocessor_config.json (older readers)
        if codebook is not None and dalle is None:
            codebook.save(staging / CODEBOOK_DIR)
        card = model_card if model_card is not None else default_model_card(model, codebook, tokenizer)
        (staging / MODEL_CARD).write_text(card if card.endswith("\n") else card + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(tokenizer_dir: Path, cfg: FlavaConfig):
    """The BERT WordPiece tokenizer in ``tokenizer_dir``, checked against the text encoder and with its
    ``model_max_length`` set to the encoder's positions."""
    if not any((tokenizer_dir / f).exists() for f in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"export_hf: {tokenizer_dir} holds no tokenizer.json or vocab.txt")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ValueError(
            f"export_hf: the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model's "
            f"text.vocab_size is {cfg.text.vocab_size}"
        )
    if tokenizer.pad_token_id != cfg.text.pad_token_id:
        raise ValueError(
            f"export_hf: the tokenizer's pad token id is {tokenizer.pad_token_id} but the model's "
            f"text.pad_token_id is {cfg.text.pad_token_id}"
        )
    for name in ("cls_token", "sep_token", "mask_token"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"export_hf: the tokenizer in {tokenizer_dir} has no {name} (not a BERT tokenizer?)")
    tokenizer.model_max_length = cfg.text.max_position_embeddings
    return tokenizer


# ------------------------------------------------------------------------------------------------- processor
def image_processor_settings(cfg: FlavaConfig, codebook: Any, data: DataConfig) -> dict[str, Any]:
    """Keyword arguments of transformers' FLAVA image processor that reproduce our image pipeline."""
    loader, masking, img = data.loader, data.masking, cfg.image
    if loader.resample not in _PIL_RESAMPLE:
        raise ValueError(f"export_hf: data.loader.resample {loader.resample!r} has no PIL filter id")
    resample = _PIL_RESAMPLE[loader.resample]
    square = {"height": img.image_size, "width": img.image_size}
    settings: dict[str, Any] = {
        # Eval transform: shorter side -> image_size, then a centre crop (flava.data.transforms).
        "do_resize": True, "size": {"shortest_edge": img.image_size}, "resample": resample,
        "do_center_crop": True, "crop_size": square,
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(loader.mean), "image_std": list(loader.std),
        # Block masking (flava.data.masking.block_mask with data.masking).
        "input_size_patches": img.grid_size,
        "total_mask_patches": max(1, round(masking.image_mask_ratio * img.num_patches)),
        "mask_group_min_patches": masking.min_block_patches,
        "mask_group_max_patches": masking.max_block_patches,
        "mask_group_min_aspect_ratio": masking.min_aspect,
        "mask_group_max_aspect_ratio": 1 / masking.min_aspect,
        "codebook_resample": resample, "codebook_do_resize": True, "codebook_do_center_crop": True,
        "codebook_do_rescale": True, "codebook_rescale_factor": 1 / 255,
    }
    if isinstance(codebook, DalleCodebook):
        if abs(loader.codebook_pixel_eps - HF_CODEBOOK_EPS) > 1e-12:
            raise ValueError(
                f"export_hf: data.loader.codebook_pixel_eps is {loader.codebook_pixel_eps}, but transformers' FLAVA "
                f"image processor maps codebook pixels with a fixed {HF_CODEBOOK_EPS}"
            )
        side = img.grid_size * codebook.downsample  # the dVAE sees 8x the patch grid (112 px for 14x14)
        settings.update({
            "codebook_size": {"shortest_edge": side}, "codebook_crop_size": {"height": side, "width": side},
            "codebook_do_normalize": False, "codebook_image_mean": [0.0, 0.0, 0.0],
            "codebook_image_std": [1.0, 1.0, 1.0], "codebook_do_map_pixels": True,
        })
    else:  # a k-means codebook (or none) reads the model's own normalised pixels
        settings.update({
            "codebook_size": {"shortest_edge": img.image_size}, "codebook_crop_size": square,
            "codebook_do_normalize": True, "codebook_image_mean": list(loader.mean),
            "codebook_image_std": list(loader.std), "codebook_do_map_pixels": False,
        })
    return settings


def build_processor(cfg: FlavaConfig, tokenizer, codebook: Any, data: DataConfig):
    """A ``FlavaProcessor`` (image processor + tokenizer). Uses the Pillow backend, which needs no torchvision;
    transformers records it as ``FlavaImageProcessor`` and picks a backend again when loading."""
    image_processor = FlavaImageProcessorPil(**image_processor_settings(cfg, codebook, data))
    return FlavaProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ model card
def default_model_card(model, codebook: Any, tokenizer) -> str:
    """A short card stating what the export holds and how to load it (used when no card is given)."""
    cfg = model.config
    img, txt, mm = cfg.image, cfg.text, cfg.multimodal
    kind = getattr(codebook, "kind", None) or "none"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [flava, vision-language, multimodal]",
        "---",
        "",
        "# FLAVA (exported from the flava pipeline)",
        "",
        f"- Parameters: {count_parameters(model):,}",
        f"- Image encoder: ViT, {img.image_size} px images, {img.patch_size} px patches, width {img.hidden_size}, "
        f"{img.num_layers} layers, {img.num_heads} heads",
        f"- Text encoder: width {txt.hidden_size}, {txt.num_layers} layers, WordPiece vocabulary of {len(tokenizer)} "
        f"tokens (embedding rows {txt.vocab_size}), {txt.max_position_embeddings} positions",
        f"- Multimodal encoder: width {mm.hidden_size}, {mm.num_layers} layers",
        f"- Contrastive projection: {cfg.projection_dim}; MIM codebook: {kind}, {cfg.codebook_size} codes",
        "",
        "The tower poolers (`flava.*_model.pooler`) are not trained by FLAVA pretraining: they hold a fixed-seed",
        "initialisation. Use `get_image_features` / `get_text_features` (projections) or the CLS hidden states.",
    ]
    if kind == "kmeans":
        lines += ["The k-means MIM codebook is in `codebook/` (flava format); transformers' model has no codebook,",
                  "so pass `mim_labels` for the MIM/MMM-image losses."]
    lines += [
        "",
        "```python",
        "from transformers import FlavaModel, FlavaProcessor",
        "model = FlavaModel.from_pretrained(path)",
        "processor = FlavaProcessor.from_pretrained(path)",
        "```",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- output
def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a non-empty directory that is not a previous FLAVA export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export_hf: out_dir {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        config = out_dir / "config.json"
        try:
            model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None
        except (OSError, ValueError):
            model_type = None
        if model_type != "flava":
            raise ValueError(
                f"export_hf: out_dir {out_dir} is not empty and holds no previous FLAVA export; refusing to replace it"
            )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


__all__ = ["export_hf", "build_processor", "image_processor_settings", "load_tokenizer"]

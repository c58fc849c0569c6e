"""Typed model configuration: one small config per tower, the loss weights, and named presets.

``FlavaConfig`` composes an image, a text and a multimodal tower config (all three share the transformer fields
of ``TransformerConfig``), a ``LossConfig`` and the few model-wide settings (projection width, temperature,
codebook size, attention kernel). ``preset(name)`` returns one of

- ``tiny``: unit tests (32 px images, 4x4 patches of 8 px, width 32, 2 layers per tower);
- ``small``: the embedded default pipeline (64 px, patch 8, width 192, 4 image + 4 text + 2 multimodal layers);
- ``base``: the paper's FLAVA (ViT-B/16 at 224 px, 768 wide, 12 + 12 + 6 layers, BERT vocabulary, DALL-E codebook).

``ModelSection`` is the ``model:`` section of ``params.yaml``: a preset name plus nested ``overrides``, resolved
at parse time into a typed ``FlavaConfig`` (``resolved``); ``build(vocab_size=..., codebook_size=...)`` adds the
values fixed by earlier stages (the fitted tokenizer's vocabulary, the fitted codebook's size). Every validation
error names the offending field.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from flava.configbase import StrictModel, deep_merge


class TransformerConfig(StrictModel):
    """The pre-norm transformer stack shared by all three towers."""

    hidden_size: int = Field(192, ge=1)
    num_layers: int = Field(4, ge=0)
    num_heads: int = Field(3, ge=1)
    intermediate_size: int = Field(768, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on embeddings and residual branches
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on attention probabilities
    layer_norm_eps: float = Field(1e-6, gt=0.0)
    hidden_act: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    qkv_bias: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class ImageEncoderConfig(TransformerConfig):
    """ViT: square images cut into square patches, a CLS token and learned positions."""

    image_size: int = Field(64, ge=1)
    patch_size: int = Field(8, ge=1)
    num_channels: int = Field(3, ge=1)
    # How pixels become the patch grid. ``patch``: FLAVA's (and ViT's) one strided convolution, linear in each
    # patch's pixels. ``conv``: a convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
    # better"): one stride-2 3x3 convolution per entry of ``stem_channels`` (its width; each followed by
    # GroupNorm and GELU), then a 1x1 convolution to ``hidden_size``, so ``patch_size`` = 2 ** len(stem_channels)
    # and the grid is the same. It learns the synthetic world's shapes from fewer steps (benchmarks/README.md,
    # "Learning curves"); transformers' FLAVA has no such stem, so such a model does not export to it.
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: tuple[int, ...] = (32, 64, 128)

    @model_validator(mode="after")
    def _patches_tile_image(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.stem == "conv":
            if not self.stem_channels or min(self.stem_channels) < 1:
                raise ValueError(f"stem_channels must be positive widths, got {list(self.stem_channels)}")
            if 2 ** len(self.stem_channels) != self.patch_size:
                need = (f"{self.patch_size.bit_length() - 1} entries" if self.patch_size & (self.patch_size - 1) == 0
                        else "a power-of-two patch_size")
                raise ValueError(
                    f"stem conv halves the resolution once per stem_channels entry: patch_size ({self.patch_size}) "
                    f"needs {need}, got {len(self.stem_channels)} ({list(self.stem_channels)})"
                )
        return self

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class TextEncoderConfig(TransformerConfig):
    """BERT-style embeddings (word + position + token type, then LayerNorm) under the shared stack."""

    vocab_size: int = Field(1000, ge=2)  # replaced by the fitted tokenizer's size in the pipeline
    max_position_embeddings: int = Field(64, ge=1)
    type_vocab_size: int = Field(2, ge=1)
    pad_token_id: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _pad_in_vocab(self):
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be < vocab_size ({self.vocab_size})")
        return self


class MultimodalEncoderConfig(TransformerConfig):
    """Fusion encoder over [mm CLS, image states, text states], each tower projected into this width."""

    num_layers: int = Field(2, ge=0)
    # Which unimodal hidden states feed the fusion: the last block's output before the tower's final LayerNorm
    # ("pre_norm", as FLAVA and transformers do) or after it ("post_norm").
    fusion_input: Literal["pre_norm", "post_norm"] = "pre_norm"


class LossConfig(StrictModel):
    """Weight per objective; 0 disables it (e.g. only ``contrastive`` > 0 is the paper's contrastive ablation)."""

    mim: float = Field(1.0, ge=0.0)
    mlm: float = Field(1.0, ge=0.0)
    mmm_image: float = Field(1.0, ge=0.0)
    mmm_text: float = Field(1.0, ge=0.0)
    itm: float = Field(1.0, ge=0.0)
    contrastive: float = Field(1.0, ge=0.0)
    # Without ``itm_labels`` in a pair batch, this fraction of its captions is swapped for another caption of the
    # batch to form ITM negatives (the reference implementation uses about 10 %).
    itm_negative_prob: float = Field(0.1, ge=0.0, le=1.0)
    # Which caption a negative row gets: ``random``, uniformly among the batch's other captions; ``hard``, drawn
    # with probability softmax(contrastive logit) over the other captions of the batch (ALBEF, Li et al. 2021),
    # so ITM must separate the pairs the contrastive space confuses. A caption identical to the row's own is
    # never its negative (it would be a false one). ``hard`` needs the contrastive loss on.
    itm_negatives: Literal["random", "hard"] = "random"

    @model_validator(mode="after")
    def _hard_negatives_need_contrastive(self):
        if self.itm_negatives == "hard" and self.contrastive <= 0:
            raise ValueError("itm_negatives 'hard' draws negatives from the contrastive similarities: it needs "
                             "contrastive > 0 (or use itm_negatives 'random')")
        return self

    def weight(self, name: str) -> float:
        return float(getattr(self, name))


OBJECTIVES = ("mim", "mlm", "mmm_image", "mmm_text", "itm", "contrastive")


class FlavaConfig(StrictModel):
    image: ImageEncoderConfig = Field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    multimodal: MultimodalEncoderConfig = Field(default_factory=MultimodalEncoderConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    projection_dim: int = Field(128, ge=1)  # contrastive embedding width
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP/FLAVA: temperature 0.07
    logit_scale_min: float = 0.0
    logit_scale_max: float = math.log(100.0)  # temperature never below 1/100
    codebook_size: int = Field(256, ge=2)  # MIM vocabulary; replaced by the fitted codebook's size
    attention: Literal["sdpa", "eager"] = "sdpa"
    initializer_range: float = Field(0.02, gt=0.0)
    activation_checkpointing: bool = False
    # Check every batch (presence, shapes, dtypes, id and label ranges) before compute, raising a ValueError that
    # names the problem. Checked on the host, so it costs no device sync: the model's forward checks batches on the
    # CPU, the trainer checks each batch before its copy to an accelerator (flava.model.batch).
    validate_inputs: bool = True
    # Add 0 * sum(params) to the loss so every parameter gets a gradient for every batch kind: DDP then works
    # without find_unused_parameters. Leave off in one process (AdamW would keep moving idle towers by momentum).
    touch_unused_parameters: bool = False

    @model_validator(mode="after")
    def _logit_scale_range(self):
        if not self.logit_scale_min <= self.logit_scale_init <= self.logit_scale_max:
            raise ValueError(
                f"logit_scale_init ({self.logit_scale_init}) must lie in "
                f"[logit_scale_min, logit_scale_max] = [{self.logit_scale_min}, {self.logit_scale_max}]"
            )
        return self


_TINY: dict[str, Any] = {
    "image": dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "text": dict(vocab_size=64, max_position_embeddings=32, hidden_size=32, num_layers=2, num_heads=2,
                 intermediate_size=64),
    "multimodal": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "projection_dim": 16,
    "codebook_size": 32,
}

_SMALL: dict[str, Any] = {
    "image": dict(image_size=64, patch_size=8, hidden_size=192, num_layers=4, num_heads=3, intermediate_size=768),
    "text": dict(vocab_size=1000, max_position_embeddings=64, hidden_size=192, num_layers=4, num_heads=3,
                 intermediate_size=768),
    "multimodal": dict(hidden_size=192, num_layers=2, num_heads=3, intermediate_size=768),
    "projection_dim": 128,
    "codebook_size": 256,
}

_BASE_TOWER = dict(hidden_size=768, num_heads=12, intermediate_size=3072, layer_norm_eps=1e-12)
_BASE: dict[str, Any] = {
    "image": dict(image_size=224, patch_size=16, num_layers=12, **_BASE_TOWER),
    "text": dict(vocab_size=30522, max_position_embeddings=512, num_layers=12, **_BASE_TOWER),
    "multimodal": dict(num_layers=6, **_BASE_TOWER),
    "projection_dim": 768,
    "codebook_size": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "small": _SMALL, "base": _BASE}


def _validate(tree: dict[str, Any], name: str) -> FlavaConfig:
    try:
        return FlavaConfig.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"invalid model config (preset {name!r}): {problems}") from None


def preset(name: str, overrides: dict[str, Any] | None = None) -> FlavaConfig:
    """A named preset (``tiny``, ``small``, ``base``), optionally with nested overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return _validate(deep_merge(PRESETS[name], overrides or {}), name)


class ModelSection(StrictModel):
    """The ``model:`` section of params.yaml: a named preset plus nested field overrides, e.g.
    ``overrides: {image: {num_layers: 6}, loss: {itm: 0}}``.

    The preset and overrides are resolved once, when the section is parsed, into the typed ``resolved``
    ``FlavaConfig`` that every reader shares (the data stages take the image size and text positions from it);
    an invalid override fails the parse, naming its field.
    """

    preset: Literal["tiny", "small", "base"] = "small"
    overrides: dict[str, Any] = Field(default_factory=dict)
    _resolved: FlavaConfig = PrivateAttr()

    @model_validator(mode="after")
    def _resolve(self):
        self._resolved = _validate(deep_merge(PRESETS[self.preset], self.overrides), self.preset)
        return self

    @property
    def resolved(self) -> FlavaConfig:
        """The effective model config of ``preset`` and ``overrides`` (before the fitted sizes of ``build``)."""
        # Reading the resolved config reads both keys it derives from, so ``flava.config.ReadRecorder`` sees
        # them; a copy keeps the shared instance unchanged by callers.
        _ = self.preset, self.overrides
        return self._resolved.model_copy(deep=True)

    def build(self, vocab_size: int | None = None, codebook_size: int | None = None) -> FlavaConfig:
        """The config the model is built from: ``resolved`` with the values fixed by earlier stages
        (``vocab_size`` from the fitted tokenizer, ``codebook_size`` from the fitted codebook)."""
        fitted: dict[str, Any] = {}
        if vocab_size is not None:
            fitted["text"] = {"vocab_size": int(vocab_size)}
        if codebook_size is not None:
            fitted["codebook_size"] = int(codebook_size)
        resolved = self.resolved
        return _validate(deep_merge(resolved.model_dump(), fitted), self.preset) if fitted else resolved

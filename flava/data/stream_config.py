"""Typed config of the streaming side: shards, fitting, transforms, masking, loaders, mixing.

Defaults are the embedded (synthetic, small) pipeline's values. The image size and patch size are not repeated
here: they come from the resolved model config (``cfg.model.resolved``), so data and model cannot disagree.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flava.configbase import StrictModel

Corpus = Literal["pairs", "images", "text"]
Kind = Literal["pair", "image", "text"]


class S3Config(StrictModel):
    """S3 access for shard roots and image URIs (``s3://bucket/key``). Credentials come from the usual AWS
    environment/config chain; ``endpoint_url`` (else ``$AWS_ENDPOINT_URL``) points at MinIO/moto/etc."""

    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold_mb: int = Field(8, ge=5)  # S3 requires parts of >= 5 MiB (except the last)
    multipart_chunk_mb: int = Field(8, ge=5)
    max_attempts: int = Field(5, ge=1)  # per request, transient errors (throttling, 5xx, connection) retried
    retry_backoff_s: float = Field(0.2, ge=0)  # first back-off of our own retry loop; doubles per attempt


class ShardConfig(StrictModel):
    """webdataset shards (``flava data shard``)."""

    corpora: list[Corpus] = Field(default_factory=lambda: ["pairs", "images", "text"])
    samples_per_shard: int = Field(256, ge=1)
    # "source": keep the image file's own bytes when it is PNG or JPEG (re-encode anything else as PNG);
    # "png"/"jpg": always re-encode (RGB). Re-encoding also applies EXIF orientation.
    image_format: Literal["source", "png", "jpg"] = "source"
    jpeg_quality: int = Field(95, ge=1, le=100)
    # Downscale so the longer side is at most this many pixels (re-encodes); None keeps the size.
    max_image_side: int | None = Field(None, ge=8)
    s3: S3Config = Field(default_factory=S3Config)

    @field_validator("corpora")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or not value:
            raise ValueError(f"data.shards.corpora must be a non-empty list without repeats, got {value}")
        return value


class TokenizerConfig(StrictModel):
    """WordPiece fitting or a local pretrained tokenizer (``flava data fit``), and tokenisation in the loader."""

    vocab_size: int = Field(2048, ge=16)
    min_frequency: int = Field(1, ge=1)
    lowercase: bool = True
    fit_corpora: list[Literal["pairs", "text"]] = Field(default_factory=lambda: ["pairs", "text"])
    max_fit_texts: int | None = Field(None, ge=1)  # cap on texts used for fitting (first N, in manifest order)
    # A local directory holding a pretrained tokenizer (``save_pretrained`` layout, e.g. BERT's); copied as is.
    # A transformers FLAVA checkpoint directory works too: only its tokenizer files are written.
    pretrained_dir: str | None = None
    max_length: int = Field(32, ge=4)  # tokens per text, incl. [CLS]/[SEP]; longer texts are truncated


class CodebookFitConfig(StrictModel):
    """Image codebook for MIM targets (``flava data fit``)."""

    kind: Literal["kmeans", "dalle"] = "kmeans"
    # kind=dalle: a local FlavaImageCodebook directory, or a transformers FLAVA checkpoint directory (its codebook)
    dalle_dir: str | None = None
    num_codes: int = Field(256, ge=2)
    iters: int = Field(20, ge=1)
    sample_images: int = Field(512, ge=1)  # images drawn (seeded) from the image corpora for the fit
    corpora: list[Literal["pairs", "images"]] = Field(default_factory=lambda: ["images", "pairs"])
    # kind=kmeans: what each patch is described by (flava.model.codebook): "pixels" (its normalised pixels: codes
    # of colour and texture) or "hog" (histograms of gradient orientation, hog_bins bins over [0, pi) in
    # hog_cells x hog_cells cells: codes of edges and their directions, the shape of what the patch cuts)
    features: Literal["pixels", "hog"] = "pixels"
    hog_bins: int = Field(9, ge=2)
    hog_cells: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _dalle_needs_dir(self):
        if self.kind == "dalle" and not self.dalle_dir:
            raise ValueError("data.codebook.dalle_dir must be set when data.codebook.kind is 'dalle'")
        return self


class MaskingConfig(StrictModel):
    """Image block masking (BEiT) and BERT masking."""

    image_mask_ratio: float = Field(0.4, gt=0, lt=1)  # FLAVA masks 40 % of patches in rectangular blocks
    min_block_patches: int = Field(4, ge=1)  # BEiT uses 16 on a 14x14 grid; the synthetic grids are smaller
    max_block_patches: int | None = Field(None, ge=1)  # None: a block may cover all that is left to mask
    min_aspect: float = Field(0.3, gt=0, le=1)
    text_mask_prob: float = Field(0.15, gt=0, lt=1)
    mask_token_fraction: float = Field(0.8, ge=0, le=1)  # of the chosen tokens: -> [MASK]
    random_token_fraction: float = Field(0.1, ge=0, le=1)  # -> a random non-special token; the rest kept
    min_masked_tokens: int = Field(1, ge=0)  # per text with real tokens, so short captions still train MLM

    @model_validator(mode="after")
    def _fractions(self):
        if self.mask_token_fraction + self.random_token_fraction > 1:
            raise ValueError("data.masking.mask_token_fraction + random_token_fraction must be <= 1")
        if self.max_block_patches is not None and self.max_block_patches < self.min_block_patches:
            raise ValueError("data.masking.max_block_patches must be >= min_block_patches")
        return self


class LoaderConfig(StrictModel):
    """Transforms, batching, workers."""

    num_workers: int = Field(0, ge=0)  # DataLoader worker processes per rank; 0 = decode in the training process
    prefetch_factor: int = Field(2, ge=1)
    # How workers start. "spawn" (default) gives each worker a fresh interpreter with the current environment, at
    # a start-up cost paid once per stream start (figures: benchmarks/README.md, "Figures cited by the code").
    # "fork" copies the training process, threads' locks and exit hooks included: under an in-process Prefect flow,
    # Prefect 3.8's services fail an assertion as each worker exits ("DataLoader worker exited unexpectedly",
    # workers left unjoined). "forkserver" workers are fresh too but inherit the environment of the moment its
    # server started (credentials set later are missing).
    start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    verify_checksums: bool = True  # check each shard's sha256 against the index on its first read per process
    # Image normalisation (CLIP/FLAVA statistics).
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # Training augmentation, off by default: the synthetic captions name positions ("left of"), so a flip or a
    # tight crop would make them false.
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    horizontal_flip: bool = False
    resample: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    # DALL-E codebook pixels are mapped from [0, 1] to [eps, 1 - eps] (its logit-Laplace input range).
    codebook_pixel_eps: float = Field(0.1, ge=0, lt=0.5)
    pad_to_max_length: bool = True  # fixed (B, max_length) text tensors; False pads to the longest in the batch

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value):
        if any(s <= 0 for s in value):
            raise ValueError(f"data.loader.std must be positive, got {value}")
        return value

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered(cls, value, info):
        lo, hi = value
        if not 0 < lo <= hi:
            raise ValueError(f"data.loader.{info.field_name} must satisfy 0 < low <= high, got {value}")
        if info.field_name == "crop_scale" and hi > 1:
            raise ValueError(f"data.loader.crop_scale must be <= 1, got {value}")
        return value


class MixingConfig(StrictModel):
    """Sampling ratios of the corpora in joint training: each step draws one whole batch from one corpus."""

    ratios: dict[Kind, float] = Field(default_factory=lambda: {"pair": 0.5, "image": 0.25, "text": 0.25})

    @field_validator("ratios")
    @classmethod
    def _valid(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"data.mixing.ratios must be non-negative with a positive sum, got {value}")
        return value

"""Typed config of the streaming side: shards, fitting, transforms, masking, loaders, mixing."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardConfig(_Section):
    """webdataset shards (``flava data shard``)."""


class TokenizerConfig(_Section):
    """WordPiece fitting or a local pretrained tokenizer (``flava data fit``)."""


class CodebookFitConfig(_Section):
    """Image codebook for MIM targets (``flava data fit``)."""


class MaskingConfig(_Section):
    """Image block masking and BERT masking."""


class LoaderConfig(_Section):
    """Transforms, batching, workers."""


class MixingConfig(_Section):
    """Sampling ratios of the corpora in joint training."""
